"""The online teacher of stage two: the cached teacher, run on the fly (the reference for cache fidelity).

Stage two never builds a teacher except here, for ``teacher_mode = "online"``; every other stage-two
module reads the teacher's features from a store. The teacher is built from the train spec's
``cache.spec`` and must be the one the store was made with (same weights digest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from customkd_cache.errors import SpecError, StoreError
from customkd_cache.specs import TrainSpec, load_cache_spec, spec_relative_path
from customkd_cache.store import FeatureStore


def create_online_teacher(
    spec: TrainSpec, spec_path: Path | None, store: FeatureStore, device: torch.device
) -> Any:
    """The teacher of the cache spec on ``device``.

    Raises SpecError without ``cache.spec``, and StoreError when its weights differ from the store's.
    """
    if not spec.cache.spec:
        raise SpecError("teacher_mode = 'online' needs cache.spec (the teacher is built from it)")
    from customkd_cache.models.teachers import create_teacher

    cpath = spec_relative_path(spec.cache.spec, spec_path)
    cspec = load_cache_spec(cpath, [])
    teacher = create_teacher(cspec.teacher, spec_dir=cpath.parent, device=device)
    cached = store.attrs.get("identity", {}).get("teacher", {}).get("weights_digest")
    if cached != teacher.weights_digest:
        raise StoreError(
            f"{store.path}: made with teacher weights {str(cached)[:12]}, but {cpath} gives "
            f"{teacher.weights_digest[:12]}; the online teacher must be the cached one"
        )
    return teacher
