"""minisora: text-to-video latent diffusion that trains and samples on one consumer GPU."""

from importlib import import_module

__version__ = "0.1.0"

# Public API, imported on first use so `import minisora` stays cheap (torch and open_clip load lazily).
_API = {
    "TextToVideoPipeline": "minisora.pipeline",
    "load_config": "minisora.config",
    "read_clip": "minisora.io",
    "save_video": "minisora.io",
    "write_video": "minisora.io",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'minisora' has no attribute {name!r}")
