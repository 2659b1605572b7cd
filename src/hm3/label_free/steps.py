"""Every label-free step, registered in its run order: the pipeline runs them stage by stage
(`registry.STAGES`), and within a stage in the order below (RegMean before distill, align_heads
before recentre). A new step is its module plus one line here."""

from hm3.label_free import align_heads, coefficients, distill, lewis, recentre, regmean, tune
from hm3.label_free.registry import get_step, register, step_names

for _step in (lewis.Lewis(), coefficients.Coefficients(), regmean.RegMean(), distill.Distill(),
              align_heads.AlignHeads(), recentre.Recentre(), tune.Tune()):
    register(_step)

__all__ = ["get_step", "step_names"]
