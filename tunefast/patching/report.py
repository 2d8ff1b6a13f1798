"""What ``tunefast.patch`` did, module by module."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PatchedEntry:
    """A module now running a tunefast kernel. ``name`` is its qualified name in the model."""

    name: str
    kernel: str
    detail: str = ""


@dataclass(frozen=True)
class SkippedEntry:
    """A module tunefast recognised but left on its original code path, and why."""

    name: str
    reason: str


LORA_KERNELS = ("lora_linear", "dora_linear", "qlora_linear")

# Call-time conditions under which a patched LoRA layer runs the original (PEFT) forward, unchanged.
RUNTIME_FALLBACKS = (
    "adapters merged into the base weight, or disabled (model.disable_adapter())",
    "mixed-adapter batches whose adapters use DoRA or lora_bias (others take the routed op)",
    "a trainable base weight, or an input dtype PEFT itself would cast (x dtype != base weight dtype)",
    "hooks registered on the layer's lora_A / lora_B / lora_dropout modules (or global module hooks), so they fire",
    "meta-device tensors (shape-only runs)",
    "lora_bias adapters whose dtype differs from the base weight's (e.g. fp32 adapters on an fp16 base)",
)


@dataclass
class PatchReport:
    """Result of :func:`tunefast.patch`: ``patched`` and ``skipped`` entries, in model order."""

    backend: str
    patched: list[PatchedEntry] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)

    def kernels(self) -> dict[str, int]:
        """Number of patched modules per kernel."""
        counts: dict[str, int] = {}
        for e in self.patched:
            counts[e.kernel] = counts.get(e.kernel, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [f"tunefast.patch (backend={self.backend}): {len(self.patched)} patched, {len(self.skipped)} skipped"]
        if not self.patched and not self.skipped:
            lines.append("  no PEFT layers found in this model")
        rows = [("patched", e.name, e.kernel + (f" ({e.detail})" if e.detail else "")) for e in self.patched]
        rows += [("skipped", e.name, e.reason) for e in self.skipped]
        if rows:
            w1 = max(len(r[1]) for r in rows)
            lines.append(f"  {'status':8} {'module':{w1}}  kernel / reason")
            lines += [f"  {s:8} {n:{w1}}  {k}" for s, n, k in rows]
        if any(e.kernel.split("[")[0] in LORA_KERNELS for e in self.patched):
            lines.append("  patched LoRA layers run PEFT's own forward at call time for:")
            lines += [f"    - {c}" for c in RUNTIME_FALLBACKS]
        return "\n".join(lines)

    __repr__ = __str__
