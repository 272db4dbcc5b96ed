r"""OPSD on the cold-started Qwen2.5-7B: the paper's other baseline, on-policy self-distillation
(arXiv 2601.18734), with everything else of configs/qwen7b.py (model, data, rollouts, optimizer,
mesh, eval), so the three arms of stage 3 differ only in what they learn from the same rollouts.

python -m tapo_jax.main --config=configs/qwen7b_opsd.py --workdir=gs://BUCKET/opsd \
  --config.model.path=/mnt/runs/cs_sft/hf --config.data.train_path=/mnt/data/dapo-math-17k.parquet

DAPO-Math-17k has no worked solutions, so the teacher sees a correct rollout of the same group
(opsd.solution_source=group) and groups with none are not distilled (opsd/rows_without_solution).
The OPSD paper's own teacher reads the dataset's reference solutions: a file with a `solution`
field (docs/data.md) and --config.opsd.solution_source=reference.
"""

import importlib.util
import pathlib


def _recipe():
  """configs/qwen7b.py's get_config() (configs are files, not a package)."""
  path = pathlib.Path(__file__).with_name("qwen7b.py")
  spec = importlib.util.spec_from_file_location("qwen7b_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _recipe()
  c.algorithm = "opsd"
  c.opsd.solution_source = "group"  # a correct rollout of the group, else the reference solution
  c.opsd.beta = 0.5  # generalized JSD with β = 0.5: the OPSD scripts' --beta 0.5
  c.opsd.grpo_coef = 0.0  # pure distillation, as the OPSD paper trains
  return c
