"""The run dir's index.html contact sheet: content, escaping, previews per format, the
updater's throttling, and a real render in headless Chromium."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from PIL import Image

from svdbatch.commands import gallery as gallery_command
from svdbatch.reports.gallery import GalleryUpdater, write_gallery
from svdbatch.rundir.layout import asset_relpath
from tests.conftest import FAST, make_image, run_cli, write_csv

from .runfiles import failures_of, results_of, sidecar_file, video_file, video_rel

GOOD = ["a&b 'q'", "ünï cødé 100%"]  # characters an id may hold that HTML and URLs must escape
BAD = "bad #1"


class Page(HTMLParser):
    """What a browser would see: card titles, media sources, card classes (entities decoded)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.titles: list[str] = []
        self.sources: list[tuple[str, str]] = []  # (tag, src)
        self.cards: list[str] = []
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_h2 = tag == "h2"
        if tag in ("img", "video") and "src" in attrs:
            self.sources.append((tag, attrs["src"]))
        if tag == "article":
            self.cards.append(attrs["class"])

    def handle_data(self, data):
        if self._in_h2:
            self.titles.append(data)
            self._in_h2 = False


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    for n in range(len(GOOD)):
        make_image(root / "img" / f"{n}.png", size=(96, 64), seed=n)
    make_image(root / "img" / "bad.png", seed=9)
    whole = (root / "img" / "bad.png").read_bytes()
    (root / "img" / "bad.png").write_bytes(whole[: len(whole) // 2])  # passes a header check, fails at load
    write_csv(
        root / "m.csv", ["id", "image", "seed"], [[GOOD[0], "img/0.png", 1], [GOOD[1], "img/1.png", 2], [BAD, "img/bad.png", 3]]
    )
    return root


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    # args first: hydra takes -m only in front of the overrides
    return run_cli(
        *args, f"manifest={root / 'm.csv'}", "run.check_images=false", "run.num_threads=1", "run.progress=false", *FAST
    )


@pytest.fixture(scope="module")
def mp4_run(images_dir, tiny_cache) -> Path:
    proc = run(images_dir, f"hydra.run.dir={images_dir / 'run'}")
    assert proc.returncode == 1, proc.stderr  # the truncated image fails
    # The page exactly as the run left it (later tests rewrite index.html with write_gallery).
    shutil.copy(images_dir / "run" / "index.html", images_dir / "index-as-written-by-the-run.html")
    return images_dir / "run"


class Cards(HTMLParser):
    """Per card: its class, title, media sources and text (entities decoded)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.cards: list[dict] = []
        self._title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article":
            self.cards.append({"class": attrs["class"], "title": None, "sources": [], "text": ""})
        elif self.cards:
            self._title = tag == "h2"
            if tag in ("img", "video", "source") and "src" in attrs:
                self.cards[-1]["sources"].append((tag, attrs["src"]))

    def handle_data(self, data):
        if not self.cards:
            return
        if self._title and self.cards[-1]["title"] is None:
            self.cards[-1]["title"] = data
        self.cards[-1]["text"] += data


def test_the_run_itself_writes_a_gallery_of_what_it_did(mp4_run):
    """index.html as a real run wrote it: every done item has a card whose relative link opens
    its video, and the failed item is shown with its error."""
    import json

    cards = Cards((mp4_run.parent / "index-as-written-by-the-run.html").read_text(encoding="utf-8")).cards
    by_title = {card["title"]: card for card in cards}
    assert len(by_title) == len(cards) == 3
    done = {record["id"]: record for record in results_of(mp4_run)}
    assert sorted(done) == sorted(GOOD)
    for item_id, record in done.items():
        card = by_title[item_id]
        assert card["class"] == "card done"
        videos = [unquote(src) for tag, src in card["sources"] if tag == "video"]
        assert videos == [record["output"]], card  # this item's own video...
        assert (mp4_run / videos[0]).resolve() == video_file(mp4_run, item_id).resolve()
        assert (mp4_run / videos[0]).stat().st_size == record["output_bytes"]  # ...which is there, complete
        sidecar = json.loads((sidecar_file(mp4_run, f"{item_id}")).read_text())
        assert f"seed{sidecar['seed']}" in card["text"].replace(" ", "")
    (failure,) = failures_of(mp4_run)
    failed = by_title[BAD]
    assert failed["class"] == "card failed" and not [tag for tag, _ in failed["sources"] if tag == "video"]
    assert failure["error"] in failed["text"]


def test_gallery_lists_every_item_with_previews_and_the_failure(mp4_run):
    index = write_gallery(mp4_run)
    assert index == mp4_run / "index.html"
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    assert sorted(page.titles) == sorted([*GOOD, BAD])
    assert sorted(page.cards) == ["card done", "card done", "card failed"]
    videos = [unquote(src) for tag, src in page.sources if tag == "video"]
    assert sorted(videos) == sorted(video_rel(mp4_run, item_id) for item_id in GOOD)
    for _, src in page.sources:  # every relative URL resolves to a file in the run dir
        assert (mp4_run / unquote(src)).is_file(), src
    thumbs = [unquote(src) for tag, src in page.sources if tag == "img"]
    assert sorted(thumbs) == sorted(asset_relpath(item_id, ".jpg") for item_id in GOOD)
    assert max(Image.open(mp4_run / thumbs[0]).size) <= 256
    assert "OSError: image file is truncated" in text and "traceback" in text
    assert "seed</dt><dd>1</dd>" in text and "motion</dt><dd>127</dd>" in text and "64×64" in text


def test_gallery_escapes_ids_in_text_and_urls(mp4_run):
    text = write_gallery(mp4_run).read_text(encoding="utf-8")
    assert "a&amp;b &#x27;q&#x27;" in text  # as text
    assert 'src="' + quote(video_rel(mp4_run, "a&b 'q'")) + '"' in text  # as a URL
    assert "%C3%BCn%C3%AF%20c%C3%B8d%C3%A9%20100%25.mp4" in text
    assert "a&b 'q'" not in text and "bad #1.mp4" not in text
    assert "<script" not in text and "http" not in text  # self-contained


def test_max_items(mp4_run):
    assert len(Page(write_gallery(mp4_run, max_items=2).read_text(encoding="utf-8")).cards) == 2
    text = write_gallery(mp4_run, max_items=0).read_text(encoding="utf-8")
    assert len(Page(text).cards) == 3 and "showing the newest" not in text


def test_a_deleted_source_or_video_still_gives_a_page(mp4_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mp4_run, copy, ignore=shutil.ignore_patterns("gallery", ".hydra"))
    video_file(copy, GOOD[0]).unlink()
    sources = {}
    for item_id in GOOD:  # the sources are gone too (the run dir was copied elsewhere)
        sidecar = sidecar_file(copy, f"{item_id}")
        sources[item_id] = sidecar.read_text(encoding="utf-8")
        # A path of the same length: a sidecar of another size than committed is not trusted as done.
        sidecar.write_text(sources[item_id].replace(str(mp4_run.parent / "img"), str(mp4_run.parent / "gon")), encoding="utf-8")
    text = write_gallery(copy).read_text(encoding="utf-8")
    assert text.count("source not available") == 2 and "video missing" in text
    assert Page(text).cards.count("card missing") == 1


def test_gif_and_frames_outputs_preview_as_images(images_dir, tiny_cache, tmp_path):
    proc = run(images_dir, "-m", "output=gif,frames", f"hydra.sweep.dir={tmp_path}", "run.limit=1")
    assert proc.returncode == 0, proc.stderr
    (gif_dir,) = tmp_path.glob("*output=gif*")
    (frames_dir,) = tmp_path.glob("*output=frames*")
    gif_page = Page(write_gallery(gif_dir).read_text(encoding="utf-8"))
    assert ("img", quote(video_rel(gif_dir, "a&b 'q'", ".gif"))) in gif_page.sources
    assert not [tag for tag, _ in gif_page.sources if tag == "video"]
    frames_page = Page(write_gallery(frames_dir).read_text(encoding="utf-8"))
    assert ("img", quote(asset_relpath("a&b 'q'", ".webp"))) in frames_page.sources
    with Image.open(frames_dir / asset_relpath(GOOD[0], ".webp")) as preview:
        assert preview.n_frames == 4  # animated: every frame


def test_updater_throttles_and_never_raises(mp4_run, tmp_path, caplog):
    updater = GalleryUpdater(mp4_run, every_s=3600, max_items=1)
    assert updater.maybe_update() == mp4_run / "index.html"  # the first call writes
    (mp4_run / "index.html").unlink()
    assert updater.maybe_update() is None and not (mp4_run / "index.html").exists()  # too soon
    assert updater.update() == mp4_run / "index.html"  # always
    broken = GalleryUpdater(tmp_path / "no-such-run-dir", every_s=0)
    with caplog.at_level(logging.WARNING, logger="svdbatch.reports.gallery"):
        assert broken.update() is None and broken.maybe_update() is None
    assert "gallery: could not write" in caplog.text


def test_gallery_subcommand(mp4_run, tmp_path, capsys):
    proc = run_cli("gallery", str(mp4_run))
    assert proc.returncode == 0 and proc.stdout.strip() == str(mp4_run / "index.html"), proc.stderr
    assert gallery_command([str(tmp_path)]) == 2 and "is not a run dir" in capsys.readouterr().err


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def test_gallery_renders_in_headless_chromium(mp4_run, tmp_path):
    browser = find_chromium()
    if browser is None:
        # CI installs chromium (.ci/run): there a missing browser is a failure, not a skip.
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium not installed; apt install chromium")
    index = write_gallery(mp4_run)
    shot = tmp_path / "gallery.png"
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            index.as_uri(),
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 100  # not a flat page
    red = sum(1 for r, g, b in rgb.getdata() if r > 180 and g < 80 and b < 80)
    assert red > 200, "the failed card's red border is missing"
