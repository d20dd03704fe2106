"""Bad input, up front: every file and value a user gives gets one message naming the file, row or field, and
exit code 2 — before the models load where possible, never a traceback from inside a library (issue 13).

Each test drives ``tether.cli.main`` as a shell would, on the toy policy (tiny GPT-2 with 128 positions,
character tokenizer) saved with ``save_pretrained``; ``docs/reliability.md`` lists the same inputs and messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tether.cli import main as cli_main
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer

REWARDS_PY = """
def broken(prompts, responses, **columns):
    scores = {}
    return [scores["score"] for _ in responses]


def zero(prompts, responses, **columns):
    return [0.0 for _ in responses]
"""

#: A tiny PPO run: 2 steps of 4 episodes, 8-token responses, no checkpoints, reports or progress bar.
TINY = [
    "--total_episodes", "8", "--rollout_batch_size", "4", "--mini_batch_size", "4", "--micro_batch_size", "4",
    "--ppo_epochs", "1", "--sampling.max_new_tokens", "8", "--logging.report_to", "jsonl",
    "--logging.progress_bar", "false", "--logging.report", "false", "--logging.save_steps", "0",
    "--memory_check", "false",
]  # fmt: skip


@dataclass(frozen=True)
class Work:
    root: Path
    policy: Path
    prompts: Path
    rewards: Path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    root = tmp_path_factory.mktemp("bad_input")
    tok = make_toy_tokenizer()
    model = make_toy_model(tok, seed=0)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    model.save_pretrained(root / "no_tokenizer")  # weights and config.json, no tokenizer files
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in make_toy_prompts(8))
    )
    (root / "rewards.py").write_text(REWARDS_PY)
    (root / "a_file").write_text("not a directory")
    return Work(root, root / "policy", root / "prompts.jsonl", root / "rewards.py")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of ``tether ARGV``."""
    code = cli_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def ppo(
    work: Work, capsys: pytest.CaptureFixture[str], *extra: str, prompts: Path | None = None
) -> tuple[int, str]:
    """``tether ppo`` on the toy policy with the zero reward, plus ``extra`` arguments (which win)."""
    return run(
        capsys, "ppo", "--policy", work.policy, "--prompts", prompts or work.prompts,
        "--reward", f"{work.rewards}:zero", "--output_dir", work.root / "out", "--device", "cpu", *TINY, *extra,
    )  # fmt: skip


def one_error_line(err: str, command: str = "ppo") -> str:
    """The single ``tether COMMAND: error: ...`` line of stderr (it must be there, and be the only one)."""
    lines = [line for line in err.splitlines() if line.startswith(f"tether {command}: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


# ---------------------------------------------------------------------------------------------------
# 1. config value ranges


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gamma", "-5"], "gamma must be in [0, 1], got -5.0"),
        (["--lam", "7"], "lam must be in [0, 1], got 7.0"),
        (["--cliprange", "-1"], "cliprange must be > 0, got -1.0"),
        (["--sampling.temperature", "inf"], "sampling.temperature must be a finite number > 0, got inf"),
        (["--sampling.top_p", "1.5"], "sampling.top_p must be in (0, 1], got 1.5"),
        (["--logging.save_steps", "-3"], "logging.save_steps must be >= 0, got -3"),
        (["--kl.coef", "nan"], "kl.coef must be a finite number >= 0, got nan"),
        (["--vf_coef", "-0.1"], "vf_coef must be >= 0, got -0.1"),
        (["--learning_rate", "0"], "learning_rate must be > 0, got 0.0"),
        (["--rollout_batch_size", "0"], "rollout_batch_size must be positive (>= 1), got 0"),
        (["--missing_eos_penalty", "nan"], "missing_eos_penalty must be a finite number, got nan"),
    ],
)
def test_config_values_out_of_range(work: Work, capsys: pytest.CaptureFixture[str], args, expected) -> None:
    code, err = ppo(work, capsys, *args)
    assert code == 2
    assert expected in one_error_line(err)


def test_reward_model_config_range(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        capsys, "rm", "--model", work.policy, "--data", work.prompts, "--output_dir", work.root / "rm",
        "--eval_fraction", "1.5",
    )  # fmt: skip
    assert code == 2
    assert "eval_fraction must be in [0, 1), got 1.5" in one_error_line(err, "rm")


def test_sample_config_range(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        capsys, "sample", "--policy", work.policy, "--prompts", work.prompts, "--batch_size", "-2"
    )
    assert code == 2
    assert "batch_size must be positive (>= 1), got -2" in one_error_line(err, "sample")


# ---------------------------------------------------------------------------------------------------
# 2. data files


def test_csv_with_an_unclosed_quote(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    path = work.root / "unclosed.csv"
    path.write_text('prompt,answer\n"hello there,1\nabc,2\ndef,3\n')
    code, err = ppo(work, capsys, prompts=path)
    assert code == 2
    assert (
        f"{path}, line 2: broken CSV quoting: a quote opened in this row is never closed"
        in one_error_line(err)
    )


def test_csv_whose_quote_swallows_rows(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    # Three lines read as one prompt: the quote opened on line 2 closes on line 4.
    path = work.root / "swallow.csv"
    path.write_text('prompt,answer\n"hello there,1\nabc,2\ndef",3\nxyz,4\n')
    code, err = ppo(work, capsys, prompts=path)
    assert code == 2
    line = one_error_line(err)
    assert f"{path}, line 2: a quoted field runs over lines 2-4 and swallows what looks like a row" in line


def test_csv_with_a_real_multiline_field_still_loads(tmp_path: Path) -> None:
    from tether.data import load_prompts

    path = tmp_path / "multi.csv"
    path.write_text('prompt,answer\n"Summarise:\nThe cat sat",x\nabc,2\n')
    assert load_prompts(path).prompts == ["Summarise:\nThe cat sat", "abc"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_file_that_is_not_utf8(work: Work, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    path = work.root / f"latin1{suffix}"
    text = (
        "prompt\nhello\ncafé au lait\n" if suffix == ".csv" else '{"prompt": "hello"}\n{"prompt": "café"}\n'
    )
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    code, err = ppo(work, capsys, prompts=path)
    assert code == 2
    line = one_error_line(err)
    row_line = 3 if suffix == ".csv" else 2
    assert f"{path}, line {row_line} (byte {offset}): not valid UTF-8 (byte 0xe9)" in line


def test_preference_file_that_is_not_utf8(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    path = work.root / "prefs.jsonl"
    path.write_bytes('{"prompt": "a", "chosen": "caf\xe9", "rejected": "no"}\n'.encode("latin-1"))
    code, err = run(capsys, "rm", "--model", work.policy, "--data", path, "--output_dir", work.root / "rm")
    assert code == 2
    assert f"{path}, line 1 (byte 30): not valid UTF-8" in one_error_line(err, "rm")


def test_preference_csv_with_broken_quoting(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    path = work.root / "prefs.csv"
    path.write_text('prompt,chosen,rejected\n"a,good,bad\nb,fine,poor\n')
    code, err = run(capsys, "rm", "--model", work.policy, "--data", path, "--output_dir", work.root / "rm")
    assert code == 2
    assert f"{path}, line 2: broken CSV quoting" in one_error_line(err, "rm")


# ---------------------------------------------------------------------------------------------------
# 3. prompt + response against the model's context (128 positions)


def test_prompt_that_fits_alone_but_not_with_the_response(
    work: Work, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_prompts(work.root / "long.jsonl", ["ab", "a" * 124])
    code, err = ppo(work, capsys, prompts=path)
    assert code == 2
    assert (
        f"{path}, row 1: prompt of 124 tokens + sampling.max_new_tokens=8 = 132 tokens, more than the model's "
        "context of 128 positions; shorten or drop the row, or lower sampling.max_new_tokens to 4 or less"
    ) in one_error_line(err)


def test_prompt_longer_than_the_context(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_prompts(work.root / "too_long.jsonl", ["ab", "a" * 140])
    code, err = ppo(work, capsys, "--max_prompt_length", "200", prompts=path)
    assert code == 2
    assert (
        f"{path}, row 1: prompt is 140 tokens long, but the model's context is 128 positions; shorten or drop "
        "the row (with sampling.max_new_tokens=8, a prompt may have at most 120 tokens)"
    ) in one_error_line(err)


def test_response_longer_than_the_context(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--sampling.max_new_tokens", "128")
    assert code == 2
    assert (
        "sampling.max_new_tokens=128 leaves no room for a prompt in the model's context of 128"
        in one_error_line(err)
    )


def test_sample_checks_the_context_too(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_prompts(work.root / "long_sample.jsonl", ["a" * 124])
    code, err = run(
        capsys, "sample", "--policy", work.policy, "--prompts", path, "--sampling.max_new_tokens", "8"
    )
    assert code == 2
    assert f"{path}, row 0: prompt of 124 tokens + sampling.max_new_tokens=8" in one_error_line(err, "sample")


# ---------------------------------------------------------------------------------------------------
# 4. paths and devices, before any model loads


def test_output_dir_that_is_a_file(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--output_dir", work.root / "a_file")
    assert code == 2
    assert f"--output_dir {work.root / 'a_file'} is a file, not a directory" in one_error_line(err)


def test_output_dir_that_cannot_be_written(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new files even to root (a chmod'ed directory would not stop root).
    code, err = ppo(work, capsys, "--output_dir", "/proc/tether-run")
    assert code == 2
    assert "--output_dir /proc/tether-run: cannot write in /proc" in one_error_line(err)


def test_read_only_output_dir(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    read_only = work.root / "read_only"
    read_only.mkdir(exist_ok=True)
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes (see the /proc test)")
        code, err = ppo(work, capsys, "--output_dir", read_only / "run")
    finally:
        read_only.chmod(0o755)
    assert code == 2
    assert f"cannot write in {read_only}" in one_error_line(err)


def test_policy_that_is_a_file(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--policy", work.root / "a_file")
    assert code == 2
    assert f"--policy {work.root / 'a_file'} is a file; give the model's directory" in one_error_line(err)


def test_policy_directory_without_config(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--policy", work.root)
    assert code == 2
    assert f"--policy {work.root} has no config.json" in one_error_line(err)


def test_policy_directory_without_tokenizer_files(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--policy", work.root / "no_tokenizer")
    assert code == 2
    line = one_error_line(err)
    assert f"--policy {work.root / 'no_tokenizer'} has no tokenizer files" in line
    assert "prompt" not in line  # the prompt file is not blamed


def test_reward_model_path_that_is_a_file(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        capsys, "rm", "--model", work.root / "a_file", "--data", work.prompts, "--output_dir", work.root
    )
    assert code == 2
    assert f"--model {work.root / 'a_file'} is a file" in one_error_line(err, "rm")


def test_device_that_does_not_exist(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--device", "banana")
    assert code == 2
    assert "--device 'banana' is not a device; use auto, cpu, cuda, cuda:N or mps" in one_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--device", "cuda")
    assert code == 2
    assert "--device 'cuda', but CUDA is not available" in one_error_line(err)


def test_sample_output_that_is_a_directory(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    out = work.root / "samples_dir"
    out.mkdir(exist_ok=True)
    code, err = run(capsys, "sample", "--policy", work.policy, "--prompts", work.prompts, "--output", out)
    assert code == 2
    assert f"--output {out} is a directory; give a file path" in one_error_line(err, "sample")
    assert not Path(f"{out}.tmp").exists()


def test_sample_write_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    from tether.sample import write_jsonl_atomic

    target = tmp_path / "out.jsonl"
    target.mkdir()  # os.replace onto a directory fails after the temp file is written
    with pytest.raises(OSError):
        write_jsonl_atomic([{"a": 1}], target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_demo_output_dir_that_is_a_file(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "demo", "--quick", "--output-dir", work.root / "a_file")
    assert code == 2
    assert f"tether demo: error: --output-dir {work.root / 'a_file'} is a file, not a directory" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# 5. a reward function that raises


def test_reward_function_that_raises(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ppo(work, capsys, "--reward", f"{work.rewards}:broken")
    assert code == 2
    assert "Traceback" not in err
    lines = err[err.index("tether ppo: error: ") :].splitlines()
    assert lines[0].startswith("tether ppo: error: reward broken raised at step 1: KeyError")
    assert lines[0].endswith(": KeyError: 'score'")
    # The user's own frames follow, and none of tether's.
    assert f'File "{work.rewards}", line 4, in broken' in lines[1]
    assert 'scores["score"]' in lines[2]
    assert not any("tether/" in line for line in lines[1:])


def test_reward_function_error_names_the_step() -> None:
    from tether.rewards import RewardFunctionError, build_reward

    def broken(prompts, responses, **columns):
        return [{}["score"] for _ in responses]

    reward = build_reward(broken)
    with pytest.raises(RewardFunctionError) as info:
        reward(["p"], ["r"], step=7)
    message = str(info.value)
    assert message.startswith("reward broken raised at step 7: KeyError: 'score'\n")
    assert "in broken" in message
    with pytest.raises(RewardFunctionError, match=r"^reward broken raised: KeyError"):
        reward(["p"], ["r"])  # no step known: not named


def test_sample_reward_function_that_raises(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        capsys, "sample", "--policy", work.policy, "--prompts", work.prompts, "--reward", f"{work.rewards}:broken",
        "--output", work.root / "s.jsonl", "--sampling.max_new_tokens", "4", "--device", "cpu",
    )  # fmt: skip
    assert code == 2
    assert "tether sample: error: reward broken raised: KeyError: 'score'" in err
    assert f'File "{work.rewards}", line 4, in broken' in err


def test_check_reward_function_that_raises(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        capsys, "check-reward", "--reward", f"{work.rewards}:broken", "--pair", "q|||good|||bad",
        "--out", work.root / "check",
    )  # fmt: skip
    assert code == 2
    assert "tether check-reward: error: reward broken raised: KeyError: 'score'" in err
    assert f'File "{work.rewards}", line 4, in broken' in err
