"""Layer tables for ``gapcam summary``: where a network's parameters are, and whether its head
is GAP + linear (so it has exact class activation maps). Builds architectures only (random
weights), so it works offline for every torchvision and timm model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gapcam.console import safe_text
from gapcam.errors import GapcamError, ModelError

#: a refusal's reason is shown whole (it quotes the model name, which was built)
REASON_LIMIT = 1000


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    parameters: int


@dataclass(frozen=True)
class Summary:
    model: str
    rows: tuple[Row, ...]
    total: int
    head: int
    head_layers: str
    cam: bool
    reason: str


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(name: str) -> Summary:
    """Summary of model ``name`` (registered, torchvision, or timm:NAME), random weights."""
    from gapcam.models import build_model

    module: nn.Module
    try:
        model = build_model(name, "random")
        module, cam, reason = (
            model.module,
            True,
            f"GAP + linear ({model.head} head): CAMs are exact",
        )
        head_modules = [model.classifier]
    except GapcamError as exc:
        module = _architecture(name, exc)
        cam, reason = False, str(exc)
        head_modules = [m for m in module.modules() if isinstance(m, nn.Linear)]
    rows = tuple(Row(n, type(m).__name__, _count(m)) for n, m in module.named_children())
    owners = {id(m): n for n, m in module.named_modules()}
    head_names = ", ".join(owners.get(id(m), "?") for m in head_modules)
    return Summary(
        name, rows, _count(module), sum(_count(m) for m in head_modules), head_names, cam, reason
    )


def _architecture(name: str, cause: GapcamError) -> nn.Module:
    """The bare architecture of a model gapcam refuses (e.g. vgg16), to show why."""
    try:
        if name.startswith("timm:"):
            import timm

            return timm.create_model(name.removeprefix("timm:"), pretrained=False)
        import torchvision

        return torchvision.models.get_model(name.removeprefix("torchvision:"), weights=None)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(str(cause)) from exc


def format_summary(summary: Summary) -> str:
    """The table, every name through ``safe_text`` (a timm or checkpoint module may name its
    layers anything)."""
    rows = [(safe_text(r.name), safe_text(r.kind), r.parameters) for r in summary.rows]
    width = max([len(name) for name, _, _ in rows] + [5])
    kind_width = max([len(kind) for _, kind, _ in rows] + [4])
    lines = [
        safe_text(summary.model),
        f"{'layer':<{width}}  {'type':<{kind_width}}  {'parameters':>13}  {'share':>6}",
    ]
    for name, kind, parameters in rows:
        share = parameters / summary.total if summary.total else 0.0
        lines.append(f"{name:<{width}}  {kind:<{kind_width}}  {parameters:>13,}  {share:>6.1%}")
    head_share = summary.head / summary.total if summary.total else 0.0
    lines += [
        f"{'total':<{width}}  {'':<{kind_width}}  {summary.total:>13,}",
        f"classifier head ({safe_text(summary.head_layers)}): {summary.head:,} parameters, "
        f"{head_share:.1%} of the network",
        f"class activation maps: {'yes' if summary.cam else 'no'} "
        f"({safe_text(summary.reason, REASON_LIMIT)})",
    ]
    return "\n".join(lines)
