"""The verify step of every converter: does the converted model compute what the original module computes?

It judges the conversion, not the kernels. The faithful original (`lapvqa_hf.convert.original`, in its own state-dict
layout) and the converted model reloaded from the written folder both run in float64 on the same random inputs, so
the only differences left are float64 rounding (about 1e-15 of the outputs' scale): every output is compared
relative to its scale, max |Δ| / max |reference| <= `tolerance`, and discrete answers (greedy answers, argmax
classes) must be identical. A mapping bug moves outputs by far more than that at any weight scale, where an
absolute threshold is blind at tiny outputs and trips over rounding at large ones.

Then the model as it ships (float32, with its CPU speed-ups) is compared with the same float64 reference within a
precision budget, also relative to scale: float32 rounding is about 1e-6 of the outputs' scale, and the budget is
`budget` (1e-4), or `ORIGINAL_ERROR_FACTOR` times the error the original module itself makes in float32 where that
is larger. Weights that make the computation ill-conditioned (attention saturated by very large weights) cost the
original in float32 up to 1e-3 of its outputs' scale, and the converted model cannot do better there.

What no comparison can see: options the weights do not reveal (number of heads, activation, ...) are assumed on
both sides, so a wrong one passes. The report names them (`assumed`).
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_TOLERANCE = 1e-9  # relative, float64 against float64: rounding there is ~1e-15
DEFAULT_FLOAT32_BUDGET = 1e-4  # relative, the shipped float32 model against the float64 original: rounding ~1e-6
ORIGINAL_ERROR_FACTOR = 100  # ... or this many times the original's own float32 error, where that is larger


@dataclass(frozen=True)
class Difference:
    """How far one output of the model is from the original's: max |Δ| and the reference's scale, max |reference|."""

    what: str  # "logit", "box", "feature", ...
    max_abs_diff: float
    scale: float

    @classmethod
    def between(cls, what: str, reference: torch.Tensor, found: torch.Tensor) -> "Difference":
        """Compared in float64. A shape mismatch or a non-finite value in either is an infinite (NaN) difference."""
        reference, found = reference.detach().double(), found.detach().double()
        scale = reference.abs().max().item() if reference.numel() else 0.0
        if reference.shape != found.shape:
            return cls(what, math.inf, scale)
        if not (torch.isfinite(reference).all() and torch.isfinite(found).all()):
            return cls(what, math.nan, scale)
        return cls(what, (reference - found).abs().max().item() if reference.numel() else 0.0, scale)

    @property
    def relative(self) -> float:
        """max |Δ| / max |reference| (0 when both are 0; NaN stays NaN and fails every bound)."""
        if self.max_abs_diff == 0:
            return 0.0
        return self.max_abs_diff / self.scale if self.scale > 0 else math.inf

    def within(self, bound: float) -> bool:
        return self.relative <= bound  # False for NaN

    def __str__(self) -> str:
        return f"max |Δ{self.what}| = {self.max_abs_diff:.2e}, relative {self.relative:.2e}"


@dataclass(frozen=True)
class Agreement:
    """Discrete outputs compared exactly: `identical` of `total` (samples' greedy answers, queries' argmax class)."""

    what: str  # "greedy answers", "argmax class"
    identical: int
    total: int
    unit: str  # "samples", "queries"

    @property
    def complete(self) -> bool:
        return self.identical == self.total

    def __str__(self) -> str:
        return f"{self.what} identical for {self.identical}/{self.total} {self.unit}"


@dataclass
class Outputs:
    """What one model gives on the verify inputs: named tensors (compared relative to scale) and, optionally,
    discrete answers (compared exactly, one per sample or query)."""

    tensors: dict[str, torch.Tensor]
    answers: list | None = None


@dataclass
class VerifyReport:
    differences: list[Difference]  # converted against original, both float64
    tolerance: float
    agreement: Agreement | None = None
    shipped: list[Difference] = field(default_factory=list)  # the model as shipped against the float64 original
    original_in_shipped_dtype: list[Difference] = field(default_factory=list)  # the original itself in that dtype
    shipped_dtype: str = "float32"
    budget: float = DEFAULT_FLOAT32_BUDGET
    assumed: dict[str, object] = field(default_factory=dict)

    def shipped_bound(self, index: int) -> float:
        """The precision budget of the shipped model's `index`-th output: `budget`, or `ORIGINAL_ERROR_FACTOR` times
        the original's own error in the shipped dtype where that is larger (NaN there gives no room)."""
        own = self.original_in_shipped_dtype[index].relative if self.original_in_shipped_dtype else 0.0
        return max(self.budget, ORIGINAL_ERROR_FACTOR * own) if math.isfinite(own) else self.budget

    @property
    def passed(self) -> bool:
        return (
            all(d.within(self.tolerance) for d in self.differences)
            and (self.agreement is None or self.agreement.complete)
            and all(d.within(self.shipped_bound(i)) for i, d in enumerate(self.shipped))
        )

    def __str__(self) -> str:
        parts = [
            f"verify {'passed' if self.passed else 'FAILED'}: float64 "
            + ", ".join(map(str, self.differences))
            + f" (tolerance {self.tolerance:.0e})"
        ]
        if self.agreement is not None:
            parts.append(str(self.agreement))
        if self.shipped:
            shipped = ", ".join(f"relative {d.relative:.2e}" for d in self.shipped)
            text = f"{self.shipped_dtype} as shipped: {shipped}"
            if self.original_in_shipped_dtype:
                own = ", ".join(f"{d.relative:.2e}" for d in self.original_in_shipped_dtype)
                text += f" (the original in {self.shipped_dtype}: {own})"
            bounds = ", ".join(f"{self.shipped_bound(i):.0e}" for i in range(len(self.shipped)))
            parts.append(f"{text} (budget {bounds})")
        if self.assumed:
            values = ", ".join(f"{name}={value}" for name, value in self.assumed.items())
            parts.append(f"assumed on both sides, not checkable from the weights: {values}")
        return "; ".join(parts)


class Probe:
    """The random inputs a verify feeds both models, and how each model is run on them.

    Subclasses make their inputs in float64 in `__init__` and implement `run_original` and `run_converted`, each
    in the module's own dtype (inputs are cast to it). Answers are asked for in the float64 comparison only.
    """

    agreement: tuple[str, str] | None = None  # (what, unit) of the answers, if the probe gives any

    def run_original(self, original: nn.Module, with_answers: bool) -> Outputs:
        raise NotImplementedError

    def run_converted(self, model: nn.Module, with_answers: bool) -> Outputs:
        raise NotImplementedError


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of a module's (first) parameter: what a probe casts its inputs to."""
    return next(module.parameters()).dtype


def _differences(reference: Outputs, found: Outputs) -> list[Difference]:
    return [Difference.between(what, tensor, found.tensors[what]) for what, tensor in reference.tensors.items()]


@torch.no_grad()
def verify_conversion(
    original: nn.Module,
    load_converted: Callable[[torch.dtype | None], nn.Module],
    probe: Probe,
    tolerance: float = DEFAULT_TOLERANCE,
    budget: float = DEFAULT_FLOAT32_BUDGET,
    assumed: dict[str, object] | None = None,
) -> VerifyReport:
    """Runs the original and the converted model (`load_converted(torch.float64)`) in float64 on `probe`'s inputs,
    then the converted model as shipped (`load_converted(None)`), and the original in that dtype, against the same
    float64 reference."""
    reference = probe.run_original(copy.deepcopy(original).to(torch.float64).eval(), with_answers=True)
    exact = probe.run_converted(load_converted(torch.float64).eval(), with_answers=reference.answers is not None)
    agreement = None
    if reference.answers is not None:
        what, unit = probe.agreement
        identical = sum(a == b for a, b in zip(reference.answers, exact.answers, strict=True))
        agreement = Agreement(what, identical, len(reference.answers), unit)
    shipped_model = load_converted(None).eval()
    shipped = probe.run_converted(shipped_model, with_answers=False)
    original_in_shipped_dtype = probe.run_original(
        copy.deepcopy(original).to(shipped_model.dtype).eval(), with_answers=False
    )
    return VerifyReport(
        differences=_differences(reference, exact),
        tolerance=tolerance,
        agreement=agreement,
        shipped=_differences(reference, shipped),
        original_in_shipped_dtype=_differences(reference, original_in_shipped_dtype),
        shipped_dtype=str(shipped_model.dtype).removeprefix("torch."),
        budget=budget,
        assumed=dict(assumed or {}),
    )


__all__ = [
    "DEFAULT_FLOAT32_BUDGET",
    "DEFAULT_TOLERANCE",
    "ORIGINAL_ERROR_FACTOR",
    "Agreement",
    "Difference",
    "Outputs",
    "Probe",
    "VerifyReport",
    "dtype_of",
    "verify_conversion",
]
