"""The README's first command: the whole chain, offline, on scikit-learn's digits."""
from __future__ import annotations

import torch
import yaml
from safetensors.torch import load_file

from nfnet_hub.hub import verify_bundle
from nfnet_hub.models.checkpoint import read_checkpoint
from nfnet_hub.quickstart import run, train_args
from nfnet_hub.train import parse_args


def test_quickstart_end_to_end_and_a_rerun_keeps_the_users_files(tmp_path, capsys):
    """The whole chain, run over an earlier quickstart's run folder (one chain: two would cost half a minute more):
    the earlier run is replaced, and a file of the user's in that folder kept."""
    run_dir = tmp_path / "runs" / "nano-digits"
    run_dir.mkdir(parents=True)
    (run_dir / "model_best.pth.tar").write_text("an earlier quickstart's")
    (run_dir / "args.yaml").write_text(yaml.safe_dump(vars(parse_args(train_args(10)))))
    (run_dir / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n9,1,1,1,1,1\n")
    (run_dir / "notes.txt").write_text("mine")
    result = run(tmp_path, progress=False)
    acc = {name: accuracy for name, accuracy, _, _ in result["rows"]}
    assert acc["PyTorch"] >= 95.0
    assert result["agree"] == result["n"] == 360  # ONNX fp32 agrees with PyTorch on every test image
    assert acc["ONNX fp32"] == acc["PyTorch"]
    assert abs(acc["ONNX int8"] - acc["ONNX fp32"]) <= 1.0
    out = capsys.readouterr().out
    assert "ONNX int8" in out and "latency (batch 1)" in out
    assert "agrees with fp32 on" in out and "Note: that is below" not in out
    assert f"nfnet-hub publish {tmp_path / 'bundle'} --repo-id" in out
    verify_bundle(tmp_path / "bundle")
    exported = load_file(tmp_path / "bundle" / "model.safetensors")  # the weights the quickstart says it exported
    named = read_checkpoint(run_dir / "last.pth.tar").state_dict
    assert f"exporting the last epoch's weights ({run_dir / 'last.pth.tar'})" in out
    assert exported.keys() == named.keys() and all(torch.equal(exported[k], named[k]) for k in named)
    assert "replacing the earlier quickstart run in" in out
    epochs = [r.split(",")[0] for r in (run_dir / "summary.csv").read_text().splitlines()]
    assert epochs == ["epoch", *map(str, range(10))]
    assert (run_dir / "notes.txt").read_text() == "mine"
