"""compare.py's mistakes: every error in a sweep is one `error:` line and a non-zero exit, found
before any member trains (the traceback only with ARCH_ZOO_DEBUG=1); a member that fails at run
time says so in one line, and the advice to run the command again is true."""

import os

import pytest

import compare
from arch_zoo.compare import SweepError

GOOD_GROUP = ('dict(name="lm", config="configs/lm.py", arg="size=test", variants=["mha"], '
              'seeds=[0])')


def run_cli(capsys, tmp_path, sweep_text=None, *extra, sweep_path=None):
  """``compare.py --sweep ... --workdir ...`` in this process: (exit code, stdout, stderr)."""
  if sweep_path is None:
    sweep_path = tmp_path / "sweep.py"
    sweep_path.write_text(sweep_text)
  code = compare.main(["--sweep", str(sweep_path), "--workdir", str(tmp_path / "runs"), *extra])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def assert_one_error_line(code, out, err, *fragments):
  assert code != 0
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  assert out == ""  # nothing ran


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
  monkeypatch.delenv("ARCH_ZOO_DEBUG", raising=False)


def test_a_missing_sweep_file(capsys, tmp_path):
  result = run_cli(capsys, tmp_path, sweep_path=tmp_path / "nope.py")
  assert_one_error_line(*result, "nope.py does not exist", "configs/sweeps/quick.py")


@pytest.mark.parametrize("text", [
    "raise RuntimeError('boom')\n",  # when executed
    "def get_sweep():\n  return [1 / 0]\n",  # when asked for its groups
    "def get_sweep(:\n",  # not even Python
])
def test_a_sweep_file_that_raises(capsys, tmp_path, text):
  result = run_cli(capsys, tmp_path, text)
  assert_one_error_line(*result, "sweep.py raised", "Fix it")


def test_an_unknown_group_key(capsys, tmp_path):
  text = f"def get_sweep():\n  return [dict({GOOD_GROUP[5:-1]}, seed=[1])]\n"
  result = run_cli(capsys, tmp_path, text)
  assert_one_error_line(*result, "Unknown sweep keys ['seed']", "valid: ")


def test_bad_groups(capsys, tmp_path):
  result = run_cli(capsys, tmp_path, f"def get_sweep():\n  return [{GOOD_GROUP}]\n",
                   "--groups", "lm,vit")
  assert_one_error_line(*result, "--groups names ['vit']", "lm")


def test_a_typo_in_one_members_attention_is_found_before_anything_trains(capsys, tmp_path):
  text = ("def get_sweep():\n  return [" + GOOD_GROUP + ",\n"
          "          dict(name='vit', config='configs/vit.py', arg='size=test', "
          "variants=['mha', 'lightnign'], seeds=[0, 1])]\n")
  result = run_cli(capsys, tmp_path, text)
  assert_one_error_line(*result, "group 'vit', variant 'lightnign'",
                        "Did you mean 'lightning'?")
  assert not (tmp_path / "runs").exists()  # the valid members did not train


def test_a_bad_override_in_a_matched_group_is_found_before_anything_trains(capsys, tmp_path):
  text = ("def get_sweep():\n  return [" + GOOD_GROUP + ",\n"
          "          dict(name='m', config='configs/lm.py', arg='size=test', match='params', "
          "variants=['mha', 'moh'], attention_overrides={'moh': {'model.attention.topk': 2}})]\n")
  result = run_cli(capsys, tmp_path, text)
  assert_one_error_line(*result, "variant 'moh'", "'model.attention.topk'",
                        "Did you mean 'top_k'?")
  assert not (tmp_path / "runs").exists()


def test_the_traceback_with_arch_zoo_debug(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("ARCH_ZOO_DEBUG", "1")
  with pytest.raises(SweepError, match="sweep.py raised ZeroDivisionError") as caught:
    run_cli(capsys, tmp_path, "def get_sweep():\n  return [1 / 0]\n")
  assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_a_changed_member_is_refused_before_anything_runs(capsys, tmp_path):
  sweep = tmp_path / "sweep.py"
  sweep.write_text(f"def get_sweep():\n  return [{GOOD_GROUP}]\n")
  member_dir = tmp_path / "runs" / "lm" / "mha" / "seed0"
  member_dir.mkdir(parents=True)
  (member_dir / "compare_member.json").write_text(
      '{"member": {"group": "lm", "variant": "mha", "attention": "mha", "seed": 0, '
      '"config_file": "configs/lm.py", "arg": "attn=mha,size=test", '
      '"overrides": {"seed": 0, "train.steps": 30}}}')
  result = run_cli(capsys, tmp_path, sweep_path=sweep)
  assert_one_error_line(*result, str(member_dir), "overrides.train.steps: 30 -> None",
                        "delete that workdir")


def test_a_member_that_fails_resumes_when_run_again(capsys, tmp_path):
  """A failure only training can find (its text files are missing): one line for it, then the
  advice; once the files exist, the same command finishes the member."""
  corpus = tmp_path / "corpus"
  text = ('def get_sweep():\n  return [dict(name="lm", config="configs/lm.py", '
          f'arg="size=test,data=text:{corpus}/*.txt", variants=["mha"], seeds=[0], '
          'overrides={"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0, '
          '"train.log_every": 2}, suite=None)]\n')
  code, out, err = run_cli(capsys, tmp_path, text)
  assert code == 1
  failures = [line for line in out.splitlines() if "FAILED" in line]
  assert len(failures) == 1 and "matches no files" in failures[0], out
  assert "run the same command again" in err
  corpus.mkdir()
  (corpus / "a.txt").write_text(" ".join(["attention is all you need to compare"] * 1000))
  code, out, err = run_cli(capsys, tmp_path, text)
  assert code == 0, err
  assert os.path.exists(tmp_path / "runs" / "lm" / "mha" / "seed0" / "final_metrics.json")


def test_bad_variants(capsys, tmp_path):
  result = run_cli(capsys, tmp_path, f"def get_sweep():\n  return [{GOOD_GROUP}]\n",
                   "--variants", "mha,lightnin")
  assert_one_error_line(*result, "--variants names ['lightnin']", "mha")


def test_bad_one_by_one_family(capsys, tmp_path):
  result = run_cli(capsys, tmp_path, f"def get_sweep():\n  return [{GOOD_GROUP}]\n",
                   "--one_by_one", "lightning")
  assert_one_error_line(*result, "--one_by_one names ['lightning']", "mha")
