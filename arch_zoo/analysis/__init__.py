"""Head diagnostics: what every head of every attention family does (docs/heads.md).

    from arch_zoo import analysis
    run = analysis.load("runs/demo_lm_mha_S")            # a train.py run, latest checkpoint
    tokens = next(run.data().eval_batches(8, 1))["inputs"]
    maps = run.attention_maps(tokens)                     # per layer: AttentionWeights [B,H,T,S]
    previous = run.per_head(tokens, analysis.metrics.previous_token)   # [layers, heads]
    summary = run.heads()                                 # eval.py --suite heads, from Python
"""

from arch_zoo.analysis import metrics, probe
from arch_zoo.analysis.core import Analysis, load, unstacked

__all__ = ["Analysis", "load", "metrics", "probe", "unstacked"]
