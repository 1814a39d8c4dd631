"""``surgeon demo`` runs end to end through the CLI and leaves each step's output behind."""

from __future__ import annotations


def test_demo_runs_every_step(cli, tmp_path):
    work = tmp_path / "demo"
    result = cli("demo", "--workdir", work)
    assert result.exit_code == 0, result.output
    steps = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert [s for s in steps if s] == ["build", "inspect", "prior", "merge", "inject-iada", "score-heads"]
    assert (work / "vlm" / "model.safetensors").exists()
    assert (work / "reasoning-llm" / "model.safetensors").exists()
    assert (work / "prior" / "surgeon.json").exists() and (work / "merged" / "config.json").exists()
    assert (work / "vlm-iada" / "surgeon-iada.safetensors").exists()
    assert (work / "heads" / "heads.json").exists() and (work / "heads" / "surgeon.json").exists()
