from customkd_cache.cli import main

main()
