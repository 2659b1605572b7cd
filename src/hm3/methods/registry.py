"""The named merge methods: one generalised task-arithmetic kernel, configured per method;
each names its paper (`MergeMethod.reference`).

Names, parameters and defaults follow mergekit. Where hm3's semantics differ it is said here
and in the README ("Merge methods"):
- `rescale: true` means 1/keep-probability for random drops (DARE, DELLA), as in the DARE
  paper, and L1-norm matching for magnitude trimming; `rescale: l1|l2|linf|density` picks a
  rule explicitly (`l1` is mergekit's rule for every method).
- A classifier head is sparsified on the expert's own rows before HM3 expansion
  (`hm3.engine.stream`), so a density means the same for a head as for any other tensor.

TIES (Yadav et al. 2023), step by step, for one tensor, and where each step lives:
  0. task vectors: tau_i = theta_i - theta_0 (`hm3.engine.stream.job_inputs`, lazily, one
     expert at a time);
  1. trim: keep each tau_i's top `density` entries by magnitude, zero the rest
     (`sparsify.magnitude`, called through `MergeMethod.sparsify`);
  2. elect sign: per entry, the sign of sum_i w_i tau_i (`consensus: sum`; a vote of the signs
     with `count`), a tie electing + (`_disjoint_sum`; `consensus.elect_sign` is the same rule
     on whole tensors, used by `MergeMethod.contributions`);
  3. disjoint mean: per entry, sum_i w_i tau_i over the experts whose w_i tau_i has the elected
     sign, divided by the sum of their weights when `normalize` (`_disjoint_sum`);
  4. theta = theta_0 + lambda * that (`_disjoint_sum`; `MergeMethod.combine` without consensus).
dare_ties, breadcrumbs_ties and della are the same with another step 1 (their sparsifier).
`_disjoint_sum` runs steps 2 to 4 on CHUNK entries at a time over the trimmed vectors kept as
their non-zero entries (`packed.Packed`): that is all that differs from the paper's form.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from hm3.errors import Hm3Error
from hm3.methods import sparsify as sp
from hm3.methods.consensus import agrees, elect_sign
from hm3.methods.packed import Packed
from hm3.methods.spectrum import flat_spectrum, task_singular

RESCALE_RULES = ("density", *sp.RESCALE_NORMS)
CHUNK = 1 << 16  # entries TIES's consensus works on at once (256 KiB of float32 per temporary)


@dataclass(frozen=True)
class Parameter:
    """A declared parameter: its default and the check that a value must pass."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    expected: str


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


WEIGHT = Parameter("weight", 1.0, _real, "a finite number")
DENSITY = Parameter("density", 1.0, lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]")
GAMMA = Parameter("gamma", 0.01, lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)")
EPSILON = Parameter("epsilon", 0.15, lambda v: _real(v) and 0 <= v < 0.5, "a number in [0, 0.5)")
LAMBDA = Parameter("lambda", 1.0, _real, "a finite number")
CONSENSUS = Parameter("consensus", "sum", lambda v: v in ("sum", "count"), "'sum' or 'count'")


@dataclass(frozen=True)
class MergeMethod:
    """A task-vector merge: optional sparsifier, optional TIES consensus, then a (normalised)
    sum."""

    name: str
    description: str
    sparsifier: Callable[..., torch.Tensor] | None = None
    consensus: bool = False
    default_normalize: bool = False
    default_rescale: bool = False
    mean_of_models: bool = False  # linear: the weighted mean of the models, not base + deltas
    # iso_c, tsv: a weight matrix's weighted task vectors merged by their spectrum (this
    # function, `hm3.methods.spectrum`); head rows are kept; other tensors take the weighted
    # mean of the task vectors
    spectral: Callable[[Iterable[torch.Tensor]], torch.Tensor] | None = None
    extra_model_parameters: tuple[Parameter, ...] = field(default_factory=tuple)
    reference: str = ""  # the method's paper: authors, year, title, arXiv id

    @property
    def random(self) -> bool:
        return self.sparsifier in (sp.bernoulli, sp.della_magprune)

    def model_parameter_specs(self) -> tuple[Parameter, ...]:
        sparse = (DENSITY,) if self.sparsifier else ()
        return (WEIGHT, *sparse, *self.extra_model_parameters)

    def shared_parameter_specs(self) -> tuple[Parameter, ...]:
        specs = [] if self.spectral else [  # Iso-C and TSV set their own scale
            Parameter("normalize", self.default_normalize, lambda v: isinstance(v, bool),
                      "true or false")]
        if not self.mean_of_models:
            specs.append(LAMBDA)
        if self.sparsifier:
            specs.append(Parameter("rescale", self.default_rescale,
                                   lambda v: isinstance(v, bool) or v in RESCALE_RULES,
                                   "true, false, density, l1, l2 or linf"))
        if self.consensus:
            specs.append(CONSENSUS)
        return tuple(specs)

    def parameter_names(self) -> list[str]:
        """Every parameter a recipe may give this method: method-wide, then per model."""
        return [p.name for p in (*self.shared_parameter_specs(), *self.model_parameter_specs())]

    def model_defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.model_parameter_specs()}

    def validate_model_parameters(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        """Check per-model parameters (weight, density, ...); unknown ones name the method's."""
        specs = {p.name: p for p in self.model_parameter_specs()}
        for name, value in params.items():
            if name not in specs:
                raise Hm3Error(f"{where}.{name}: method {self.name} takes no `{name}`; "
                               f"its per-model parameters are {', '.join(specs)}")
            if not specs[name].check(value):
                raise Hm3Error(f"{where}.{name}: expected {specs[name].expected}, got {value!r}")
        epsilon = params.get("epsilon", EPSILON.default)
        density = params.get("density")
        if self.sparsifier is sp.della_magprune and density is not None and density < 1 and not (
                0 < density - epsilon and density + epsilon < 1):
            raise Hm3Error(f"{where}: della needs density ± epsilon inside (0, 1), got density "
                           f"{density} and epsilon {epsilon}; lower epsilon or move density")
        return dict(params)

    def validate_shared(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        """Check method-wide parameters and fill in their defaults."""
        specs = {p.name: p for p in self.shared_parameter_specs()}
        allowed = self.parameter_names()
        out = {name: spec.default for name, spec in specs.items()}
        for name, value in params.items():
            if name not in specs and name in allowed:  # a per-model parameter
                continue
            if name not in specs:
                raise Hm3Error(f"{where}.{name}: method {self.name} takes no `{name}`; "
                               f"allowed: {', '.join(allowed)}")
            if not specs[name].check(value):
                raise Hm3Error(f"{where}.{name}: expected {specs[name].expected}, got {value!r}")
            out[name] = value
        return out

    def sparsify(self, delta: torch.Tensor, params: dict[str, Any], shared: dict[str, Any],
                 generator: torch.Generator | None) -> torch.Tensor:
        """Apply this method's sparsifier to one model's task-vector tensor."""
        if self.sparsifier is None:
            return delta
        extra = {p.name: params.get(p.name, p.default) for p in self.extra_model_parameters}
        return self.sparsifier(delta, params.get("density", 1.0),
                               rescale_rule=self.rescale_rule(shared.get("rescale")),
                               generator=generator, **extra)

    def rescale_rule(self, rescale: Any) -> str | None:
        if rescale is False or rescale is None:
            return None
        if rescale is True:
            return "density" if self.random else "l1"
        return rescale

    def combine(self, base: torch.Tensor, deltas: Iterable[torch.Tensor], weights: list[float],
                shared: dict[str, Any], role: str = "other") -> torch.Tensor:
        """Merge (already sparsified) task vectors into the base: consensus, sum, normalise, scale.

        `deltas` may be a lazy iterable, consumed in model order. Without consensus each
        weighted delta is added to one running sum as it comes, so memory holds one of them;
        TIES consensus needs them all: it keeps each one's non-zero entries, never a weighted
        copy, and works on CHUNK entries at a time (`_disjoint_sum`). `role` (read by
        `spectral` methods only): `matrix`, a layer's weight matrix (merged as one, by its
        spectrum); `head`, task-disjoint head rows (each kept as weighted, no lambda); `other`.
        """
        w = torch.tensor(weights, dtype=base.dtype)
        if self.consensus:
            return _disjoint_sum(base, deltas, w.tolist(), shared)
        if self.spectral and role == "matrix":  # the weighted task vectors, lazily
            weighted = (delta * w[i] for i, delta in enumerate(deltas))
            return base + shared["lambda"] * self.spectral(weighted).to(base.dtype)
        total_weight = w.sum()
        mixed = torch.zeros_like(base)
        for i, delta in enumerate(deltas):
            mixed.add_(delta, alpha=float(w[i]))
        divisor = total_weight
        if divisor.abs() < 1e-8:
            divisor = torch.ones((), dtype=base.dtype)
        if self.spectral:  # heads and other tensors (no consensus, no normalize setting)
            if role == "head":
                return base + mixed
            return base + shared["lambda"] * mixed.div_(divisor)
        if self.mean_of_models:  # sum w_i theta_i = base * sum w_i + sum w_i delta_i
            if shared["normalize"] and total_weight.abs() > 1e-8:
                return base + mixed.div_(total_weight)
            return base * total_weight + mixed
        if shared["normalize"]:
            mixed.div_(divisor)
        return base + shared["lambda"] * mixed

    def contributions(self, base: torch.Tensor, deltas: Iterable[torch.Tensor],
                      weights: list[float], shared: dict[str, Any]) -> list[torch.Tensor]:
        """Each model's share c_i of the merge, so that `combine` == base + sum(c_i): what
        learned coefficients scale. Holds N tensors at once (unlike `combine`)."""
        if self.spectral:
            raise ValueError(f"{self.name} merges a weight matrix's task vectors by their "
                             "spectrum: its merge is not a sum of per-expert shares")
        deltas = list(deltas)
        n = len(deltas)
        w = torch.tensor(weights, dtype=base.dtype)
        if self.mean_of_models:
            total = w.sum()
            scale = w / total if shared["normalize"] and total.abs() > 1e-8 else w
            return [(delta + base) * scale[i] - base / n for i, delta in enumerate(deltas)]
        weighted = [delta * w[i] for i, delta in enumerate(deltas)]
        if self.consensus:
            elected = elect_sign(weighted, shared["consensus"])
            agree = [agrees(delta, elected) for delta in weighted]
            divisor = torch.zeros_like(base)
            for i in range(n):
                divisor += w[i] * agree[i]
            divisor[divisor == 0] = 1
            shares = [delta * agree[i] for i, delta in enumerate(weighted)]
        else:
            divisor = w.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones((), dtype=base.dtype)
            shares = weighted
        scale = shared["lambda"]
        return [share / divisor * scale if shared["normalize"] else share * scale
                for share in shares]


def _disjoint_sum(base: torch.Tensor, deltas: Iterable[torch.Tensor], weights: list[float],
                  shared: dict[str, Any]) -> torch.Tensor:
    """TIES's steps 2 to 4: per entry, the weighted sum of the deltas whose sign (of w * delta)
    is the elected one (divided by their weights' sum if `normalize`), times lambda, plus the
    base. Each delta is packed to its non-zero entries as it comes (`Packed`: a trimmed delta
    takes a fraction of its tensor), and the steps run CHUNK entries at a time, so the sign
    score, elected signs, divisor and temporaries stay small whatever the tensor, in the CPU's
    cache. The weighted delta is rounded before it is summed (not a fused multiply-add), so a
    sum near 0 elects the same sign as mergekit's."""
    signs = [math.copysign(1.0, x) if x else 0.0 for x in weights]
    packed = [Packed(delta) for delta in deltas]  # each dense delta freed once packed
    merged = torch.zeros_like(base)
    out, reference = merged.view(-1), base.reshape(-1)
    for start in range(0, out.numel(), CHUNK):
        stop = min(start + CHUNK, out.numel())
        parts = [delta.part(start, stop) for delta in packed]
        score = torch.zeros_like(out[start:stop])
        for part, weight, sign in zip(parts, weights, signs):
            if shared["consensus"] == "sum":
                score.add_(part * weight)
            else:
                score.add_(part.sign(), alpha=sign)
        elected = score.sign_().add_(0.5).sign_()  # +1 where score >= 0 (a tie elects +1)
        divisor = torch.zeros_like(elected)
        chunk = out[start:stop]
        for part, weight, sign in zip(parts, weights, signs):
            if not sign:
                continue  # weight 0: sign(w * delta) is never the elected sign
            agree = part.sign()
            agree = (agree.neg_() if sign < 0 else agree).eq_(elected)  # 1 where w * delta has it
            chunk.addcmul_(part, agree, value=weight)
            divisor.add_(agree, alpha=weight)
        if shared["normalize"]:
            chunk.div_(divisor.add_(divisor == 0))  # 1 where no expert agrees
        chunk.mul_(shared["lambda"]).add_(reference[start:stop])
    return merged


def _registry(*methods: MergeMethod) -> dict[str, MergeMethod]:
    table: dict[str, MergeMethod] = {}
    for method in methods:
        if method.name in table:
            raise ValueError(f"merge method {method.name!r} is registered twice")
        table[method.name] = method
    return table


# The papers, as their arXiv pages title them.
MODEL_SOUPS = ("Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models "
               "improves accuracy without increasing inference time, arXiv:2203.05482")
TASK_ARITHMETIC = "Ilharco et al. 2022, Editing Models with Task Arithmetic, arXiv:2212.04089"
TIES = ("Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, "
        "arXiv:2306.01708")
DARE = ("Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous "
        "Models as a Free Lunch, arXiv:2311.03099")
BREADCRUMBS = ("Davari and Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging "
               "with Sparse Masks, arXiv:2312.06795")
DELLA = ("Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
         "Magnitude-Based Sampling, arXiv:2406.11617")
ISO_C = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
         "Task-Specific Subspaces, arXiv:2502.04959")
TSV = ("Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model "
       "Merging, arXiv:2412.00081")

METHODS = _registry(
    MergeMethod("linear", "Model Soup: weighted mean of the models", default_normalize=True,
                mean_of_models=True, reference=MODEL_SOUPS),
    MergeMethod("task_arithmetic", "base + lambda * sum of weighted task vectors",
                reference=TASK_ARITHMETIC),
    MergeMethod("ties", "TIES: trim by magnitude, elect signs, disjoint mean",
                sparsifier=sp.magnitude, consensus=True, default_normalize=True,
                reference=TIES),
    MergeMethod("dare_linear", "DARE: random drop and rescale, then sum",
                sparsifier=sp.bernoulli, default_rescale=True, reference=DARE),
    MergeMethod("dare_ties", "DARE drop and rescale, then TIES sign election",
                sparsifier=sp.bernoulli, consensus=True, default_rescale=True,
                reference=f"{DARE}; {TIES}"),
    MergeMethod("breadcrumbs", "Model Breadcrumbs: drop small entries and large outliers",
                sparsifier=sp.magnitude_outliers, extra_model_parameters=(GAMMA,),
                reference=BREADCRUMBS),
    MergeMethod("breadcrumbs_ties", "Model Breadcrumbs with TIES sign election",
                sparsifier=sp.magnitude_outliers, consensus=True,
                extra_model_parameters=(GAMMA,), reference=f"{BREADCRUMBS}; {TIES}"),
    MergeMethod("della", "DELLA: magnitude-ranked random drop, TIES sign election",
                sparsifier=sp.della_magprune, consensus=True, default_normalize=True,
                default_rescale=True, extra_model_parameters=(EPSILON,), reference=DELLA),
    MergeMethod("della_linear", "DELLA drop without sign election",
                sparsifier=sp.della_magprune, default_rescale=True,
                extra_model_parameters=(EPSILON,), reference=DELLA),
    # TIES's trim step without its sign election (mergekit's `magnitude` has no paper of its own)
    MergeMethod("magnitude", "magnitude pruning of each task vector, then sum",
                sparsifier=sp.magnitude, reference=TIES),
    MergeMethod("iso_c", "Iso-C: summed task vectors with a flat spectrum per weight matrix",
                spectral=flat_spectrum, reference=ISO_C),
    MergeMethod("tsv", "TSV-Merge: each task vector's top singular directions, decorrelated",
                spectral=task_singular, reference=TSV),
)


def get_method(name: Any) -> MergeMethod:
    """The registered method called `name`; a KeyError lists the known names."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name).lower().replace("-", "_"), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}{hint}")
    return METHODS[name]
