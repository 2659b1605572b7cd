"""Does `distill` stop short of what a block can reach? Blocks 0 and 1 of the MPNet zoo's merge
(TIES 0.2, 171-640 unseen texts per task) distilled with the step's default 24 steps and with
more; prints each block's relative error against the experts before and after.

  .venv/bin/python benchmarks/distill_steps.py
(RESULTS.md section 10; only the first two blocks, so a row takes minutes, not an hour.)
"""

import tempfile
import time
from pathlib import Path

import hm3.label_free.distill as distill
from hm3.demo import held_out_texts
from hm3.engine import build_model, merge_into, open_sources
from hm3.pipeline import calibrate
from hm3.recipe import parse_recipe
from hm3.zoo import build_mpnet_zoo

from mpnet_zoo import HEAD_STEPS, recipe

real = distill.find_blocks


def first_two(model):
    prefix, blocks = real(model)
    return prefix, blocks[:2]


distill.find_blocks = first_two
zoo = build_mpnet_zoo(progress=False)
raw = recipe(zoo, list(zoo.experts), HEAD_STEPS, "per-task+unseen", Path(tempfile.mkdtemp()))
held = held_out_texts(zoo)
sources = open_sources(parse_recipe(raw))
cal = calibrate(sources, held, expert_logits=False, lewis_scores=False)
model = build_model(sources)
merge_into(model, sources)
merged = {k: v.clone() for k, v in model.state_dict().items()}
for steps, lr in ((24, 0.02), (96, 0.02), (240, 0.02), (96, 0.1)):
    model.load_state_dict(merged)
    t = time.time()
    r = distill.distill_body(
        model, sources, cal, distill.DistillOptions(steps=steps, lr=lr, last="hidden")
    )
    print(
        f"steps {steps} lr {lr}: before {r.error_before} after {r.error_after} "
        f"({time.time() - t:.0f}s)",
        flush=True,
    )
