"""Image classification through the one training loop: falling loss with accuracy, exact resume
(augmentation included), and eval.py's test accuracy."""

import json
import math

import numpy as np
import pytest

import eval as eval_lib
import train
from configs import vit
from tests.helpers import train_losses


def config_for(data_dir, train_split="train[:1000]", test_split="test[:200]", **train_overrides):
  config = vit.get_config("attn=mha,size=test")
  # Slices keep the tests quick; the test size augments (pad-crop and flip) so that resume also
  # checks that augmentation is a pure function of the sample index.
  config.data.update(data_dir=data_dir, train_split=train_split, eval_split=test_split,
                     test_split=test_split)
  config.train.update(progress=False, **train_overrides)
  return config


def test_loss_falls_and_accuracy_rises(fashion_mnist_data_dir, tmp_path):
  config = config_for(fashion_mnist_data_dir, "train[:6000]", "test[:1000]", steps=80,
                      log_every=10, eval_every=0, checkpoint_every=0)
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(str(tmp_path))
  assert losses[80] < losses[10] - 0.25, losses
  assert final["loss"] < math.log(10) - 0.25 and final["accuracy"] > 0.3, final  # chance: 0.1
  assert final["examples"] == 1000
  info = json.load(open(tmp_path / "run_info.json"))
  assert info["flops"]["train_flops_per_image"] > 0 and info["flops"]["tokens"] == 16
  assert info["parameters"]["embedding"] > 0  # the patch embedding


def test_resume_is_exact_and_eval_restores_the_test_accuracy(fashion_mnist_data_dir, tmp_path):
  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(config_for(fashion_mnist_data_dir), full_dir)
  stopped = train.train_and_evaluate(config_for(fashion_mnist_data_dir, stop_at_step=10),
                                     split_dir)
  assert stopped == {"step": 10}
  resumed = train.train_and_evaluate(config_for(fashion_mnist_data_dir), split_dir)
  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every logged step
  assert resumed == full | {"eval_seconds": resumed["eval_seconds"],
                            "train_throughput": resumed["train_throughput"]}
  # eval.py restores the last checkpoint and reports the test split, here also the validation
  # split: the same numbers as the end of training.
  record = eval_lib.evaluate_run(split_dir)
  test = record["results"]["classification"]
  assert record["step"] == 20 and test["split"] == "test[:200]"
  np.testing.assert_allclose(test["loss"], resumed["loss"], rtol=1e-6)
  assert test["accuracy"] == resumed["accuracy"]
  saved = json.load(open(tmp_path / "split" / "eval_results.json"))
  assert saved["results"]["classification"]["examples"] == 200
  assert saved["task"] == "classification" and saved["suite"] == "default"
  # No recall probe fits an image classifier: a clear error, and the saved results stay.
  with pytest.raises(ValueError, match="No recall evaluator fits a classification run"):
    eval_lib.evaluate_run(split_dir, suite="recall")
  assert json.load(open(tmp_path / "split" / "eval_results.json")) == saved
