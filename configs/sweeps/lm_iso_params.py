r"""The quick sweep's LM comparison at matched parameters: each family's MLP width ``d_ff`` is
solved so that its parameter count is within 2% of mha's (compare.py checks it); the attention
itself is as in configs/sweeps/quick.py.

    python compare.py --sweep configs/sweeps/lm_iso_params.py --workdir runs/lm_iso

Use ``match="flops"`` for the same at matched training FLOPs per token.
"""

from configs.sweeps import quick


def get_sweep():
  lm = next(g for g in quick.get_sweep() if g["name"] == "lm")
  return [dict(lm, name="lm_iso_params", match="params", reference="mha")]


def get_claims():
  return [dict(claim, group="lm_iso_params") for claim in quick.get_claims()
          if claim["group"] == "lm"]
