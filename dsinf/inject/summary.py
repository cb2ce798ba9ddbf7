"""What `inject` did, as data (`InjectionSummary`) and as the one log message it writes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Fused:
    """A block rewritten as a whole: `kind` 'attention', 'mlp' or 'layer', `detail` what runs now."""
    name: str
    kind: str
    detail: str


@dataclass(frozen=True)
class Skipped:
    """A module left as it was (or only partly rewritten), and why."""
    name: str
    reason: str


@dataclass
class InjectionSummary:
    """`dsinf.injection_summary(model)`. `replaced`: names of the `nn.Linear`s now running on dsinf
    (those inside fused blocks included, under their original names); `rope`: the per-model RoPE decision."""
    dtype: str
    quantize: str | None
    groups: int | None
    rope_fused: bool = False
    rope: str = "no Llama-family attention"
    replaced: list[str] = field(default_factory=list)
    fused: list[Fused] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    backends: dict[str, int] = field(default_factory=dict)  # backend name -> number of injected modules
    aten_routed: int = 0  # float linears whose shape the measured routes send to ATen for every M
    cuda_graph: str = ""  # how decode steps run on CUDA graphs ('' when they do not)
    stop_check: str = ""  # generate's stop check deferred on CUDA ('' when it is not)
    routes: str = ""  # the measured routes of the model's shapes: how many measured now, how many reused
    float_heads: list[str] = field(default_factory=list)  # output heads on dsinf left float under quantize

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        weights = (f"int8 weight-only ({'per channel' if self.groups is None else f'{self.groups} groups'}) on "
                   f"{len(self.replaced) - len(self.float_heads)} of them" if self.quantize else self.dtype)
        attn = sum(f.kind == "attention" for f in self.fused)
        mlp = sum(f.kind == "mlp" for f in self.fused)
        layers = sum(f.kind == "layer" for f in self.fused)
        backends = ", ".join(f"{n} {b}" for b, n in sorted(self.backends.items()))
        lines = [f"dsinf.inject: {len(self.replaced)} linear layers on dsinf ({weights}; backends: {backends or '-'}); "
                 f"fused {attn} attention blocks, {mlp} MLPs, {layers} decoder layers (norms + MLP on MLPGemmOp); "
                 f"RoPE: {self.rope}"]
        if self.cuda_graph:
            lines.append(f"  {self.cuda_graph}")
        if self.stop_check:
            lines.append(f"  {self.stop_check}")
        if self.routes:
            lines.append(f"  {self.routes}")
        if self.float_heads:
            lines.append(f"  {', '.join(self.float_heads)} on dsinf in {self.dtype}, not quantized: the logits are "
                         f"what int8 rounding hurts most (skip=('lm_head',) leaves it to torch)")
        if self.aten_routed:
            lines.append(f"  {self.aten_routed} linear modules call torch's linear: the measured routes found "
                         f"ATen at least as fast for their shape at every M (python -m dsinf.routes)")
        reasons: dict[str, list[str]] = {}
        for s in self.skipped:
            reasons.setdefault(s.reason, []).append(s.name)
        for reason, names in reasons.items():
            shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  kept {shown}: {reason}")
        return "\n".join(lines)
