"""Optional dependencies ("extras") and the error that names the one to install.

The library needs only torch, numpy, safetensors and tqdm. Everything else is an extra of the
``looptrace`` distribution; code that needs one calls :func:`require` first, so that a user of the bare
install gets one line that says what to install instead of an ``ImportError`` from deep inside.
"""

from __future__ import annotations

import importlib.util

from looptrace.errors import MissingExtraError

#: extra -> the modules it provides (any one of a tuple of alternatives is enough).
EXTRAS: dict[str, tuple[tuple[str, ...], ...]] = {
    "studies": (("matplotlib",), ("scipy",)),
    "store": (("faiss",),),
    "hf": (("transformers",), ("accelerate",)),
    "lightning": (("lightning", "pytorch_lightning"),),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-removed package
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported (empty when the extra is installed)."""
    return [alts[0] for alts in EXTRAS[extra] if not any(_importable(a) for a in alts)]


def install_hint(extra: str) -> str:
    return f'pip install "looptrace[{extra}]"'


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` if any of its modules is missing.

    ``what`` says what needs it, e.g. ``"looptrace train"``."""
    gone = missing(extra)
    if gone:
        raise MissingExtraError(
            f"{what} needs the {extra!r} extra ({', '.join(gone)} not installed): {install_hint(extra)}"
        )
