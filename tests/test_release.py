"""Release manifests: every mistake refused before anything is built, and a bundle reused (or a model left
published) only while its entry's settings and files are those it was built from. Publishing uses the real
huggingface_hub client against tests/hub_stub.py (a stand-in for the Hub's upload endpoints)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import timm
import torch
from conftest import randomise
from hub_stub import HubStub
from safetensors.torch import load as load_safetensors

from nfnet_hub.models.checkpoint import save_safetensors
from nfnet_hub.release import STATE, read_manifest, release

ENTRIES = ('[[model]]\nrepo_id = "me/nano-a"\nmodel = "nfnet_hub_nano"\nweights = "nano.safetensors"\n\n'
           '[[model]]\nrepo_id = "me/nano-b"\nmodel = "nfnet_hub_nano"\nweights = "nano.safetensors"\n')


def _nano(seed: int) -> torch.nn.Module:
    return randomise(timm.create_model("nfnet_hub_nano", num_classes=10), seed=seed)


def _commits(hub: HubStub) -> list[str]:
    return [path for method, path in hub.requests if "/commit/" in path]


def _published_weights(hub: HubStub, repo_id: str) -> torch.Tensor:
    return load_safetensors(hub.files(repo_id)["model.safetensors"])["head.fc.weight"]


def test_release_builds_publishes_and_resumes(tmp_path, capsys):
    save_safetensors(_nano(11), tmp_path / "nano.safetensors")
    manifest = tmp_path / "release.toml"
    manifest.write_text('[defaults]\nprecisions = ["fp32"]\ndataset = "digits"\nopset = 17\n\n' + ENTRIES
                        + "img_size = 64\n")
    run = dict(out=tmp_path / "rel", endpoint=None, token="hf_x")
    with HubStub() as hub:
        run["endpoint"] = hub.url
        dry = release(manifest, dry_run=True, **run)
        assert all(r["dry_run"] for r in dry) and not _commits(hub)
        first = release(manifest, **run)
        assert [r["verified"] for r in first] == [True, True]
        first_out = capsys.readouterr().out
        assert "reusing the verified bundle" in first_out  # built by the dry run
        pretrained_cfg = json.loads(hub.files("me/nano-b")["config.json"])["pretrained_cfg"]
        assert pretrained_cfg["input_size"] == [3, 64, 64] and "test_input_size" not in pretrained_cfg
        assert onnx.load_from_string(hub.files("me/nano-b")["model.onnx"]).opset_import[0].version == 17
        commits = len(_commits(hub))
        again = release(manifest, **run)
        assert all(r["skipped"] for r in again) and len(_commits(hub)) == commits
        assert "[2/2] me/nano-b: already published" in capsys.readouterr().out
        assert all(f"pinned: {r['repo_id']}@{r['commit']}" in first_out for r in first)

        # an edited entry is built and published again (it was skipped, and its old bundle reused)
        manifest.write_text(manifest.read_text().replace("img_size = 64", "img_size = [48, 40]"))
        edited = release(manifest, **run)
        out = capsys.readouterr().out
        assert edited[0]["skipped"] and edited[1]["verified"] and len(_commits(hub)) == commits + 1
        assert "me/nano-b: published as" in out and "(img_size changed): publishing it again" in out
        assert "me/nano-b: the bundle in" in out and "(img_size changed): building it again" in out
        pretrained_cfg = json.loads(hub.files("me/nano-b")["config.json"])["pretrained_cfg"]
        assert pretrained_cfg["input_size"] == [3, 48, 40]

        card = tmp_path / "rel" / "me__nano-a" / "README.md"  # the one file meant to be edited: published again
        card.write_text(card.read_text() + "\n## Intended use\n\nDigits.\n")
        assert [bool(r.get("skipped")) for r in release(manifest, **run)] == [False, True]
        out = capsys.readouterr().out
        assert "me/nano-a: published as" in out and "(its model card edited): publishing it again" in out
        assert "reusing the verified bundle" in out and "edited by hand: it went up as edited" in out
        assert hub.files("me/nano-a")["README.md"].decode() == card.read_text()
        assert all(r["skipped"] for r in release(manifest, **run))  # published as edited: nothing left to do

        (tmp_path / "rel" / "me__nano-a" / "config.json").write_text("{}")
        assert release(manifest, dry_run=True, **run)[0]["dry_run"]
        assert "(altered or incomplete): building it again" in capsys.readouterr().out

        # weights retrained in place are another model: both entries are rebuilt from them (a card edited by hand
        # in the meantime is kept beside its bundle: the rebuilt card has new figures)
        card_b = tmp_path / "rel" / "me__nano-b" / "README.md"
        card_b.write_text(card_b.read_text() + "\nNotes of mine.\n")
        edited_b = card_b.read_text()
        retrained = _nano(12)
        save_safetensors(retrained, tmp_path / "nano.safetensors")
        assert not all(r.get("skipped") for r in release(manifest, **run))
        out = capsys.readouterr().out
        assert "(weights changed): building it again" in out
        kept = tmp_path / "rel" / "me__nano-b.README.edited-1.md"
        assert f"edited by hand: the edit is kept in {kept}" in out and kept.read_text() == edited_b
        assert "Notes of mine" not in card_b.read_text()
        for repo_id in ("me/nano-a", "me/nano-b"):
            assert torch.equal(_published_weights(hub, repo_id), retrained.state_dict()["head.fc.weight"])

        # a state that does not record settings (or a bundle put there by hand) is not trusted
        state = tmp_path / "rel" / STATE
        recorded = json.loads(state.read_text())
        assert set(recorded["me/nano-a"]) == {"built", "published", "commit", "commit_url", "card"}
        state.write_text(json.dumps({r: {"commit": v["commit"], "commit_url": v["commit_url"]}
                                     for r, v in recorded.items()}))
        release(manifest, **run)
        assert "(settings not recorded): publishing it again" in capsys.readouterr().out
        assert all(v["published"] for v in json.loads(state.read_text()).values())


def test_release_failure_names_the_model_and_keeps_what_was_done(tmp_path, capsys):
    save_safetensors(_nano(11), tmp_path / "nano.safetensors")
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\n")
    manifest = tmp_path / "release.toml"
    manifest.write_text(ENTRIES + 'labels = "labels.txt"\n')
    with HubStub() as hub:
        run = dict(out=tmp_path / "rel", endpoint=hub.url, token="hf_x")
        with pytest.raises(ValueError, match="^me/nano-b: --labels .* names 3 classes, but the model has 10"):
            release(manifest, **run)
        assert set(json.loads((tmp_path / "rel" / STATE).read_text())) == {"me/nano-a"}
        (tmp_path / "labels.txt").write_text("".join(f"c{i}\n" for i in range(10)))
        release(manifest, **run)
        out = capsys.readouterr().out
        assert "[1/2] me/nano-a: already published" in out and "[2/2] me/nano-b: published" in out
        assert json.loads(hub.files("me/nano-b")["config.json"])["label_names"][9] == "c9"


@pytest.mark.parametrize("text, needles", [
    ('[[model]]\nrepo_id = "nope"\nmodel = "x"\nprecisions = ["int8", "fp32"]\ncolour = 1\n',
     ["unknown keys colour", "missing 'weights'", "not of the form ORG/NAME", "int8 needs", "unknown model 'x'"]),
    ('[default]\nprecisions = ["fp32", "int8"]\n\n' + ENTRIES,  # misspelt: its settings would be left out
     ["unknown top-level keys default"]),
    ('[[model]]\nrepo_id = "me/a"\nmodel = "nfnet_hub_nano"\nweights = "w"\nprecisions = "fp32"\nimg_size = "big"\n'
     'private = "yes"\nlicense = 3\nmin_agreement = 95\n',
     ["'precisions' must be a list of fp32, fp16, int8", "'img_size' must be a side or [height, width]",
      "'private' must be true or false, got 'yes'", "'license' must be a non-empty string, got 3",
      "'min_agreement' (int8's least top-1 agreement with fp32) must be a number between 0 and 1, got 95"]),
    ('[[model]]\nrepo_id = "me/a"\nmodel = "nfnet_hub_nano"\nweights = "w"\nprecisions = ["fp16"]\n'
     'img_size = [32, 0]\n', ["that holds fp32", "got [32, 0]"]),
    (ENTRIES.replace("nano-b", "nano-a"), ["repo_id me/nano-a is listed by models 0, 1"]),
    (ENTRIES + "opset = 16\n", ["model 1: opset 16 is not supported: choose one from 17"]),
    (ENTRIES + 'license = "MIT"\n', ["model 1: license 'MIT' is not a license identifier the Hub takes (the Hub "
                                     "writes it 'mit')"]),
    ('[defaults]\nopset = "20"\n\n' + ENTRIES, ["model 0: opset '20' is not supported", "model 1: opset '20'"]),
    ('[[model]]\nrepo_id = "me/a"\nmodel = "nfnet_hub_f0"\nweights = "timm:nope"\n',
     ["nfnet_hub_f0 has no pretrained tag 'nope'; it has: dm_in1k"]),
    ('[[model]]\nrepo_id = "me/a"\nmodel = "nfnet_hub_f0"\nweights = "timm:deepmind_in1k"\n',
     ['nfnet_hub_f0.deepmind_in1k has no weights to download (these have: nfnet_hub_f0.dm_in1k): give them as a '
      'file (weights = "PATH"); the authors\' .npz converts with nfnet-hub convert deepmind']),
    ('model = 3\n', ["'model' must be [[model]] tables"]),
    ('[defaults]\nlicense = "mit"\n', ["lists no [[model]]"]),
])
def test_release_manifest_mistakes_are_refused_before_any_work(tmp_path, text, needles):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError) as e:
        read_manifest(tmp_path / "bad.toml")
    for needle in needles:
        assert needle in str(e.value)


def test_release_manifest_files_are_checked_before_any_work(tmp_path):
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "nano.safetensors").write_bytes(b"")
    (tmp_path / "bom" / "release.toml").write_bytes(ENTRIES.encode("utf-8-sig"))  # as Notepad may save it
    assert [e["repo_id"] for e in read_manifest(tmp_path / "bom" / "release.toml")] == ["me/nano-a", "me/nano-b"]
    shipped = tmp_path / "export" / "release.toml"
    shipped.parent.mkdir()
    shipped.write_text((Path(__file__).parent.parent / "export" / "release.toml").read_text())
    with pytest.raises(ValueError, match=r"no calibration folder at .*export/calibration \(models 0, 1"):
        read_manifest(shipped)  # before any download or build
    (tmp_path / "export" / "calibration").mkdir()
    entries = read_manifest(shipped)
    assert entries[0]["repo_id"] == "nfnet-hub/nfnet_f0.dm_in1k" and entries[0]["weights"] == "timm:dm_in1k"
    (tmp_path / "local.toml").write_text('[[model]]\nrepo_id = "me/x"\nmodel = "nfnet_hub_nano"\n'
                                         'weights = "nano.safetensors"\nlabels = "labels.txt"\n')
    with pytest.raises(ValueError, match=r"no labels file at .*labels.txt \(model 0\); no weights file at"):
        read_manifest(tmp_path / "local.toml")
