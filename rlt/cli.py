"""key=value command lines for the offline tools (score, distill, eval)."""
from __future__ import annotations

from omegaconf import OmegaConf


def parse_kv(argv: list[str], defaults: dict, required: tuple[str, ...], prog: str, extra_yaml=None) -> dict:
    """Merge ``key=value`` arguments over defaults; unknown keys and missing required ones exit with a message."""
    base = OmegaConf.create(defaults)
    if extra_yaml is not None:
        base = OmegaConf.merge(base, OmegaConf.load(extra_yaml))
    OmegaConf.set_struct(base, True)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except Exception as e:  # an unknown key names itself in the message
        raise SystemExit(f"{prog}: {e}") from None
    missing = [k for k in required if cfg[k] is None]
    if missing:
        raise SystemExit(f"{prog}: missing required argument(s) {', '.join(f'{k}=...' for k in missing)}")
    return OmegaConf.to_container(cfg)
