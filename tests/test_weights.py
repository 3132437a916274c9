"""``python -m detector weights`` and checkpoint sets, without network (HF_HUB_OFFLINE=1).

Drive and the Hub cannot be reached here: the listing is built in the test, gdown's calls
are replaced where a server would answer, the Hugging Face cache is laid out by hand, and a
resumed download is served by a local HTTP server. The real-architecture convert test is
marked ``slow``.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_inctrl_heads
from detector import create_detector
from detector.artefacts import AmbiguousListing, RemoteFile, sha256_file, tensor_digest
from detector.backbone import load_backbone
from detector.checkpoint_sets import read_manifest, resolve_set
from detector.checkpoints import read_header
from detector.errors import CheckpointError
from detector.methods.inctrl import InCTRLDetector
from detector.synthetic import add_defect, texture
from detector import downloads, weights_cli, weights_fetch

TINY = {"backbone": "tiny-test", "backbone_weights": "random"}


@pytest.fixture(autouse=True)
def weights_home(tmp_path, monkeypatch):
    home = tmp_path / "weights-home"
    monkeypatch.setenv("DETECTOR_WEIGHTS_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def normals(count: int) -> list[np.ndarray]:
    return [texture("grating", 3, (80, 96), index=i) for i in range(count)]


def query() -> np.ndarray:
    return add_defect(texture("grating", 3, (72, 90), index=50), seed=50)[0]


random_heads = random_inctrl_heads


def clip_state(model_name: str = "tiny-test", perturb: float = 0.0) -> dict[str, torch.Tensor]:
    """A CLIP in the official InCTRL key layout (no ``logit_scale``)."""
    model = load_backbone(model_name, "random").model
    generator = torch.Generator().manual_seed(99)
    return {
        k: v.clone() + perturb * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
        if k != "logit_scale"
    }


def tiny_converted_set(folder: Path, shots=(2, 4, 8)) -> list[Path]:
    """Converted heads files (k = 2, 4, 8, trained on MVTec AD) for the tiny backbone."""
    clip = folder.parent / "tiny-clip.safetensors"
    from safetensors.torch import save_file

    save_file(clip_state(), str(clip))
    out = []
    for index, k in enumerate(shots):
        original = folder.parent / f"checkpoint_{k}.pyth"
        torch.save({**clip_state(), **random_heads(10 + index)}, original)
        converted = weights_fetch.convert_file(
            InCTRLDetector, original, shots=k, trained_on="mvtec", out_dir=folder, backbone="tiny-test", reference=clip
        )
        assert converted.clip is None and converted.clip_matches_reference is True
        out.append(converted.heads)
    return out


# -- listings -----------------------------------------------------------------------------------


LISTING = [
    RemoteFile("id2", "trained_on_mvtec/2-shot/checkpoint_6.pyth"),
    RemoteFile("id4", "trained_on_mvtec/4-shot/checkpoint_6.pyth"),
    RemoteFile("id8", "trained_on_mvtec/8-shot/checkpoint_6.pyth"),
    RemoteFile("idr", "README.txt"),
]


def test_listing_maps_names_to_shots_and_training_set():
    planned = InCTRLDetector.plan_downloads(LISTING)
    assert [(p.remote.file_id, p.shots, p.trained_on, p.set_name) for p in planned] == [
        ("id2", 2, "MVTec AD", "mvtec"), ("id4", 4, "MVTec AD", "mvtec"), ("id8", 8, "MVTec AD", "mvtec"),
    ]
    assert [p.shots for p in InCTRLDetector.plan_downloads(LISTING, shots=[4])] == [4]
    # A bare dataset name may be the target, not the training set: refused unless told.
    bare = [RemoteFile("a", "visa/k4/checkpoint_6.pyth")]
    with pytest.raises(AmbiguousListing, match="pass --trained-on"):
        InCTRLDetector.plan_downloads(bare)
    assert InCTRLDetector.plan_downloads(bare, trained_on="MVTec AD")[0].set_name == "mvtec"
    # Two epochs for one shot count, or no shot count at all: refused with the listing.
    with pytest.raises(AmbiguousListing, match="several files for k = 8") as twice:
        InCTRLDetector.plan_downloads(LISTING + [RemoteFile("id8b", "trained_on_mvtec/8-shot/checkpoint_10.pyth")])
    assert len(twice.value.listing) == 5
    with pytest.raises(AmbiguousListing, match="shot count not named"):
        InCTRLDetector.plan_downloads([RemoteFile("x", "models/checkpoint_6.pyth")], trained_on="mvtec")


def test_fetch_refuses_an_ambiguous_listing_and_prints_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    listing = LISTING + [RemoteFile("id8b", "trained_on_mvtec/8-shot/checkpoint_10.pyth")]
    monkeypatch.setattr(weights_fetch, "list_drive_folder", lambda folder_id, by_hand: listing)
    monkeypatch.setattr(weights_fetch, "download_file", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    out = io.StringIO()
    assert weights_cli.main(["fetch", "inctrl"], out) == 2
    text = out.getvalue()
    assert "refusing to guess" in text and "id8b  trained_on_mvtec/8-shot/checkpoint_10.pyth" in text
    assert "--file-id ID --shots K --trained-on NAME" in text


def test_fetch_downloads_converts_records_and_deletes_the_original(monkeypatch, tmp_path, weights_home):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    published = tmp_path / "published.pyth"
    torch.save({**clip_state(perturb=0.01), **random_heads(3)}, published)
    monkeypatch.setattr(weights_fetch, "list_drive_folder", lambda folder_id, by_hand: LISTING)

    def fake_download(file_id, target, by_hand):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(published.read_bytes())
        return target

    monkeypatch.setattr(weights_fetch, "download_file", fake_download)
    out = io.StringIO()
    assert weights_cli.main(["fetch", "inctrl", "--shots", "2", "4", "--backbone", "tiny-test"], out) == 0, out.getvalue()
    entries = read_manifest("inctrl")
    heads = sorted(k for k in entries if not k.endswith(".clip.safetensors"))
    assert heads == ["mvtec/inctrl_mvtec_2shot.safetensors", "mvtec/inctrl_mvtec_4shot.safetensors"]
    # No official CLIP is cached to compare with, so the CLIP part is kept (once, shared).
    assert len([k for k in entries if k.endswith(".clip.safetensors")]) == 1
    assert "kept beside the heads" in out.getvalue() and "deleted the original" in out.getvalue()
    assert not list((weights_home / ".downloads").rglob("*.pyth"))
    header = read_header(weights_home / "inctrl" / heads[1])
    assert header["shots"] == 4 and header["trained_on"] == "MVTec AD"
    assert header["source_sha256"] == sha256_file(published) and header["source_file"] == "checkpoint_6.pyth"
    # The cached set runs as checkpoint="official"; its kept CLIP part is the backbone.
    detector = create_detector("inctrl", checkpoint="official", backbone="tiny-test").fit(normals(4))
    assert detector.describe()["checkpoint_shots"] == 4 and "CLIP part kept" in detector.describe()["backbone_weights"]
    with pytest.raises(CheckpointError, match="holds no checkpoint files"):
        create_detector("inctrl", checkpoint="official:visa", backbone="tiny-test")


def test_offline_fetch_ends_at_once_with_what_to_do_by_hand():
    start = time.perf_counter()
    out = io.StringIO()
    assert weights_cli.main(["fetch", "inctrl"], out) == 1
    assert weights_cli.main(["fetch", "clip"], out) == 1
    assert time.perf_counter() - start < 10
    text = out.getvalue()
    assert "HF_HUB_OFFLINE is set" in text and "drive.google.com/drive/folders/1McmfxF8_H0BeRvcJ_poGIB-ATQCDDEIa" in text
    assert "python -m detector weights convert inctrl FILE --shots K --trained-on NAME" in text
    assert "huggingface.co/timm/vit_base_patch16_plus_clip_240.laion400m_e31" in text


def test_drive_quota_error_becomes_a_clear_message(monkeypatch):
    import gdown

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def refuse(**kwargs):
        raise gdown.exceptions.FileURLRetrievalError("Too many users have viewed or downloaded this file recently.")

    monkeypatch.setattr(gdown, "download_folder", refuse)
    out = io.StringIO()
    assert weights_cli.main(["fetch", "inctrl"], out) == 1
    assert "download quota exceeded" in out.getvalue() and "convert inctrl FILE" in out.getvalue()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload``, honouring Range; the first ``failures`` answers stop ``cut``
    bytes in (a connection that drops, on the first try and on gdown's 2 retries)."""

    payload = b""
    cut = 0
    failures = 3
    requests: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
        type(self).requests.append(self.headers.get("Range"))
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if len(type(self).requests) <= self.failures:
            self.wfile.write(body[: self.cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    payload = np.random.default_rng(0).bytes(3_000_000)
    _RangeHandler.payload, _RangeHandler.cut, _RangeHandler.requests = payload, 1_000_000, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/epoch_7.pth"
    target = tmp_path / "dl" / "epoch_7.pth"
    try:
        with pytest.raises(downloads.DownloadFailed):
            downloads.download_file(url, target, by_hand="by hand", quiet=True)
        parts = downloads.partial_files(target.parent)
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(payload)
        kept = parts[0].stat().st_size
        downloads.download_file(url, target, by_hand="by hand", quiet=True)
    finally:
        server.shutdown()
    assert target.read_bytes() == payload and not downloads.partial_files(target.parent)
    assert _RangeHandler.requests[-1] == f"bytes={kept}-"  # the second call asked only for the rest


# -- convert ------------------------------------------------------------------------------------


def test_convert_keeps_scores_and_keeps_a_differing_clip_part(tmp_path):
    clip, heads = clip_state(perturb=0.01), random_heads(5)
    original = tmp_path / "checkpoint_6.pyth"
    torch.save({**clip, **heads}, original)
    same = tmp_path / "same-clip.pt"
    torch.save(clip, same)
    other = tmp_path / "other-clip.pt"
    torch.save(clip_state(perturb=0.02), other)
    images, image = normals(2), query()
    reference = create_detector("inctrl", backbone="tiny-test", checkpoint=str(original)).fit(images).predict(image)

    equal = weights_fetch.convert_file(InCTRLDetector, original, shots=2, trained_on="visa", out_dir=tmp_path / "a",
                                       backbone="tiny-test", reference=same)
    assert equal.clip is None and equal.clip_matches_reference and equal.header["clip_sha256"] == tensor_digest(clip)
    kept = weights_fetch.convert_file(InCTRLDetector, original, shots=2, trained_on="visa", out_dir=tmp_path / "b",
                                      backbone="tiny-test", reference=other)
    assert kept.clip is not None and kept.clip_matches_reference is False
    from detector.checkpoints import state_keys

    assert sorted(state_keys(equal.heads)) == sorted(heads)
    for detector in (
        create_detector("inctrl", checkpoint=str(equal.heads), backbone_weights=str(same)),
        create_detector("inctrl", checkpoint=str(kept.heads)),  # the kept CLIP part is the backbone
    ):
        result = detector.fit(images).predict(image)
        assert result.score == pytest.approx(reference.score, abs=1e-6)
        np.testing.assert_allclose(result.raw_map, reference.raw_map, atol=1e-6)
        assert not any("other CLIP weights" in w for w in result.warnings)
    # Heads used with CLIP weights they were not trained with: every result says so.
    wrong = create_detector("inctrl", checkpoint=str(equal.heads), backbone_weights=str(other)).fit(images).predict(image)
    assert any("other CLIP weights" in w for w in wrong.warnings)


class _Hostile:
    def __reduce__(self):
        return (Path.touch, (Path(_Hostile.marker),))


def test_convert_refuses_a_pickle_that_runs_code(tmp_path):
    _Hostile.marker = str(tmp_path / "ran")
    file = tmp_path / "checkpoint_6.pyth"
    with open(file, "wb") as handle:
        pickle.dump({"adapter.fc.0.weight": _Hostile()}, handle)
    torch_file = tmp_path / "zip.pyth"
    torch.save({"adapter.fc.0.weight": _Hostile()}, torch_file)
    for path in (file, torch_file):
        out = io.StringIO()
        assert weights_cli.main(["convert", "inctrl", str(path), "--shots", "2", "--trained-on", "mvtec", "--clip-reference", "none"], out) == 2
        assert "error:" in out.getvalue()
    assert not (tmp_path / "ran").exists()


def test_convert_without_shots_says_what_is_missing(tmp_path):
    file = tmp_path / "heads.pyth"
    torch.save(random_heads(1), file)
    out = io.StringIO()
    assert weights_cli.main(["convert", "inctrl", str(file), "--clip-reference", "none"], out) == 2
    assert "--shots K --trained-on NAME" in out.getvalue()


# -- sets -----------------------------------------------------------------------------------------


def test_a_set_picks_the_nearest_shot_count_and_reports_it(tmp_path):
    folder = tmp_path / "set"
    tiny_converted_set(folder)
    detector = create_detector("inctrl", checkpoint=str(folder), **TINY)
    detector.fit(normals(3))
    info = detector.describe()
    assert info["checkpoint_shots"] == 4 and info["trained_on"] == "MVTec AD" and info["checkpoint"] == str(folder)
    assert info["checkpoint_file"].endswith("inctrl_mvtec_4shot.safetensors") and info["checkpoint_set_shots"] == [2, 4, 8]
    result = detector.predict(query())
    assert any("trained with 4 normal images" in w and "3 are fitted" in w for w in result.warnings)
    detector.fit(normals(2))
    assert detector.describe()["checkpoint_shots"] == 2 and not detector.predict(query()).warnings
    # Ties go to the larger shot count; the heads really change with the member.
    members = resolve_set(str(folder), **__import__("detector.base", fromlist=["x"]).set_arguments(InCTRLDetector))
    assert [members.choose(k).shots for k in (1, 2, 3, 5, 6, 7, 8)] == [2, 2, 4, 4, 8, 8, 8]
    alone = create_detector("inctrl", checkpoint=str(members.choose(2).path), **TINY).fit(normals(2)).predict(query())
    assert detector.predict(query()).score == pytest.approx(alone.score, abs=1e-7)


def test_the_app_panel_and_banner_say_what_runs(tmp_path):
    from detector.service import InspectionService, ServiceConfig
    from ui.views import banner_markdown, weights_markdown

    folder = tmp_path / "set"
    tiny_converted_set(folder)
    service = InspectionService(ServiceConfig(checkpoints={"inctrl": str(folder)}, **TINY))
    report = service.inspect(["inctrl"], normals(4), query())
    panel = weights_markdown("inctrl", report.outcomes[0].description)
    assert "trained (k = 4, MVTec AD)" in panel and "inctrl_mvtec_4shot.safetensors" in panel
    banner, _ = banner_markdown(service, ["inctrl"])
    assert "k = 2, 4, 8 (MVTec AD)" in banner
    # The fit cache key carries the identity of the file in use.
    key = service.cached_keys()[0]
    assert key[3][0].endswith("inctrl_mvtec_4shot.safetensors")
    free = InspectionService(ServiceConfig(**TINY))
    assert "python -m detector weights fetch inctrl" in banner_markdown(free, ["inctrl"])[0]
    free_panel = weights_markdown("inctrl", free.inspect(["inctrl"], normals(2), query()).outcomes[0].description)
    assert "training-free" in free_panel and "random backbone" in free_panel


def test_hub_repo_set_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    files = tiny_converted_set(tmp_path / "set", shots=(2, 8))
    repo = cache / "models--someone--inctrl-heads"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    detector = create_detector("inctrl", checkpoint="hf-hub:someone/inctrl-heads", **TINY).fit(normals(3))
    assert detector.describe()["checkpoint_shots"] == 2  # |3 - 2| < |3 - 8|
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        create_detector("inctrl", checkpoint="hf-hub:someone/missing", **TINY)


# -- verify and push --------------------------------------------------------------------------------


def test_verify_finds_truncated_and_corrupt_files(tmp_path, weights_home, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    for index, k in enumerate((2, 4, 8)):
        original = tmp_path / f"checkpoint_{k}.pyth"
        torch.save(random_heads(20 + index), original)
        weights_fetch.convert_file(InCTRLDetector, original, shots=k, trained_on="mvtec", backbone="tiny-test", reference=None)
    home = weights_home / "inctrl" / "mvtec"
    two, four = home / "inctrl_mvtec_2shot.safetensors", home / "inctrl_mvtec_4shot.safetensors"
    two.write_bytes(two.read_bytes()[:-1])
    data = bytearray(four.read_bytes())
    data[-1] ^= 0xFF
    four.write_bytes(bytes(data))
    out = io.StringIO()
    assert weights_cli.main(["verify"], out) == 1
    text = out.getvalue()
    assert "inctrl/mvtec/inctrl_mvtec_2shot.safetensors: truncated" in text
    assert "inctrl/mvtec/inctrl_mvtec_4shot.safetensors: corrupt" in text
    assert "ok       inctrl/mvtec/inctrl_mvtec_8shot.safetensors" in text and "2 problem(s)" in text
    assert not two.exists() and not four.exists() and sorted(read_manifest("inctrl")) == ["mvtec/inctrl_mvtec_8shot.safetensors"]
    assert weights_cli.main(["verify"], io.StringIO()) == 0


def test_verify_checks_cached_clip_blobs_against_their_names(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--timm--vit_base_patch16_clip_224.openai"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    blob = repo / "blobs" / hashlib.sha256(b"the real weights").hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"the real weights, damaged")
    link = repo / "snapshots" / commit / "open_clip_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    out = io.StringIO()
    assert weights_cli.main(["verify"], out) == 1
    assert "vit_base_patch16_clip_224.openai/open_clip_model.safetensors: corrupt" in out.getvalue()
    assert not blob.exists() and not link.exists()


def test_push_model_card_names_source_licence_and_files(tmp_path, weights_home):
    original = tmp_path / "checkpoint_6.pyth"
    torch.save(random_heads(1), original)
    weights_fetch.convert_file(InCTRLDetector, original, shots=4, trained_on="mvtec", backbone="tiny-test", reference=None)
    out = io.StringIO()
    assert weights_cli.main(["push", "me/inctrl-heads", "--dry-run"], out) == 0
    card = out.getvalue()
    assert card.startswith("---\nlicense: apache-2.0")
    assert "drive.google.com/drive/folders/1McmfxF8_H0BeRvcJ_poGIB-ATQCDDEIa" in card and "Apache-2.0" in card
    assert f"`{sha256_file(weights_home / 'inctrl' / 'mvtec' / 'inctrl_mvtec_4shot.safetensors')}`" in card
    assert f"sha256 `{sha256_file(original)}`" in card and "| 4 | MVTec AD |" in card
    assert "INCTRL_CHECKPOINT=hf-hub:me/inctrl-heads" in card and "  - me/inctrl-heads inctrl_mvtec_4shot.safetensors" in card
    offline = io.StringIO()
    assert weights_cli.main(["push", "me/inctrl-heads"], offline) == 1 and "nothing was uploaded" in offline.getvalue()


def test_list_shows_sources_cache_state_and_sizes(tmp_path):
    original = tmp_path / "checkpoint_6.pyth"
    torch.save(random_heads(1), original)
    weights_fetch.convert_file(InCTRLDetector, original, shots=8, trained_on="visa", backbone="tiny-test", reference=None)
    out = io.StringIO()
    assert weights_cli.main(["list"], out) == 0
    text = out.getvalue()
    assert "ViT-B-16-plus-240 / laion400m_e32  hf-hub:timm/vit_base_patch16_plus_clip_240.laion400m_e31" in text
    assert "heads, 8-shot, trained on VisA: cached visa/inctrl_visa_8shot.safetensors" in text
    assert "heads, 2-shot, trained on MVTec AD: not cached (published 835 MB" in text


# -- the real architecture ----------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_of_an_official_file_scores_like_the_original(tmp_path):
    """An official-format 345-key file of the real ViT-B-16-plus-240 (random init): its
    converted heads with the same CLIP weights score identically to the original."""
    clip = clip_state("ViT-B-16-plus-240")
    heads = random_heads(7, embed_dim=640, num_patches=225)
    original = tmp_path / "checkpoint_6.pyth"
    torch.save({**clip, **heads}, original)
    assert len(clip) + len(heads) == 345
    del clip
    converted = weights_fetch.convert_file(InCTRLDetector, original, shots=2, trained_on="mvtec", out_dir=tmp_path / "out", reference=None)
    assert converted.clip is not None and converted.heads.stat().st_size < 5_000_000
    images = [texture("grating", 3, (240, 320), index=i) for i in range(2)]
    image = add_defect(texture("grating", 3, (300, 240), index=9), seed=9)[0]
    first = create_detector("inctrl", checkpoint=str(original)).fit(images).predict(image)
    second = create_detector("inctrl", checkpoint=str(converted.heads)).fit(images).predict(image)
    assert second.score == pytest.approx(first.score, abs=1e-6)
    np.testing.assert_allclose(second.raw_map, first.raw_map, atol=1e-6)
    for key in ("text_score", "image_residual_score", "holistic_score"):
        assert second.extras[key] == pytest.approx(first.extras[key], abs=1e-6)
