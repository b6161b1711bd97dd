"""Manual review: the decisions file, `ivl review apply`, the review web app and the HTML reports, the pages
driven in a real headless Chromium."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, read_rows

from pipeline.html_report import write_chain_report, write_job_report
from pipeline.review import MANUAL_REASON, append_decision, apply_decisions, load_decisions
from pipeline.review_server import serve
from pipeline.schema import CANONICAL, rows_to_table

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & </div>'


def _conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _review_table(rows: list[dict], reasons: list[str], scores: list[float | None]) -> pa.Table:
    t = rows_to_table(rows, CANONICAL)
    return (t.append_column("review_reason", pa.array(reasons, pa.string()))
            .append_column("score_ngram", pa.array(scores, pa.float64())))


@pytest.fixture()
def run(tmp_path, sample_images):
    """A curate OUT laid out as `ivl curate` writes it, with real Tux Paint images, a hostile row and a
    duplicate removed in favour of a review row."""
    imgs = [open(p, "rb").read() for p in sample_images[:3]]
    d = tmp_path / "curate"
    review = [
        {"id": "cap/0", "source": "cap", "category": "captioning", "images": [imgs[0]], "meta": "{}",
         "conversations": _conv("<image>\nDescribe the picture.", "A drawing. A drawing. A drawing.")},
        {"id": "cap/1", "source": "cap", "category": "captioning", "images": [imgs[1], imgs[2]], "meta": "{}",
         "conversations": _conv("<image>\n<image>\nCompare them.", "Two stamps side by side.")},
        {"id": "txt/0", "source": "txt", "category": "", "images": [], "meta": "{}",
         "conversations": _conv("Say something.", HOSTILE)},
    ]
    reasons = ["text_rules:duplicate_lines", "ngram_repetition:repeated_10gram;text_rules:few_stop_words",
               "text_rules:symbol_ratio"]
    os.makedirs(d / "review")
    pq.write_table(_review_table(review[:2], reasons[:2], [0.4, None]), d / "review" / "a-000.parquet")
    pq.write_table(_review_table(review[2:], reasons[2:], [0.9]), d / "review" / "b-000.parquet")
    os.makedirs(d / "kept")
    kept = [{"id": "txt/1", "source": "txt", "category": "", "images": [], "meta": "{}",
             "conversations": _conv("Name a prime.", "Seven is prime.")}]
    pq.write_table(rows_to_table(kept), d / "kept" / "b-000.parquet")
    os.makedirs(d / "rejected")
    dup = rows_to_table([{"id": "cap/9", "source": "cap", "category": "", "images": [imgs[0]], "meta": "{}",
                          "conversations": review[0]["conversations"]}])
    dup = dup.append_column("reject_reason", pa.array(["dedup:exact"])).append_column("dup_of", pa.array(["cap/0"]))
    pq.write_table(dup, d / "rejected" / "a-000.parquet")
    os.makedirs(d / "report")
    (d / "report" / "summary.json").write_text(json.dumps(
        {"input": 5, "kept": 1, "rejected": 1, "review": 3, "reasons": {"dedup:exact": 1},
         "review_reasons": {r: 1 for r in ";".join(reasons).split(";")}, "sources": {"cap": {"input": 3}}}))
    return str(d)


def _digest(folder: str) -> dict[str, str]:
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(folder, "*", "*.parquet")))}


# ---- decisions and apply ------------------------------------------------------------------------

def test_decisions_latest_wins_across_reviewers_and_a_torn_line_is_skipped(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    append_decision(a, "x", "keep")
    append_decision(b, "x", "reject", "blurry")  # later: wins over a's
    append_decision(a, "y", "reject")
    append_decision(a, "y", "keep", "fine after all")
    with open(a, "a") as f:
        f.write('{"id": "z", "decis')  # a crash mid-write
    got = load_decisions([a, b])
    assert {k: (v["decision"], v["note"]) for k, v in got.items()} == {
        "x": ("reject", "blurry"), "y": ("keep", "fine after all")}
    with pytest.raises(ValueError):
        append_decision(a, "x", "maybe")


def test_apply_moves_reviewed_rows_keeps_the_rest_and_reruns_identically(run, tmp_path):
    dec = str(tmp_path / "decisions.jsonl")
    append_decision(dec, "cap/0", "keep")
    append_decision(dec, "txt/0", "reject", "markup, not an answer")
    out = str(tmp_path / "applied")
    s = apply_decisions(run, [dec], out)
    assert (s["input"], s["kept"], s["rejected"], s["review"]) == (5, 2, 2, 1)
    kept_ids = sorted(r["id"] for r in read_rows(os.path.join(out, "kept")))
    assert kept_ids == ["cap/0", "txt/1"]
    rej = {r["id"]: r for r in read_rows(os.path.join(out, "rejected"))}
    assert rej["txt/0"]["reject_reason"] == MANUAL_REASON and rej["txt/0"]["review_note"] == "markup, not an answer"
    assert rej["txt/0"]["conversations"][1]["value"] == HOSTILE  # content columns untouched
    assert [r["id"] for r in read_rows(os.path.join(out, "review"))] == ["cap/1"]
    kept_row = next(r for r in read_rows(os.path.join(out, "kept")) if r["id"] == "cap/0")
    assert kept_row["images"] == read_rows(os.path.join(run, "review"))[0]["images"]  # image bytes as they were
    first = _digest(out)
    apply_decisions(run, [dec], out)
    assert _digest(out) == first
    # decisions change (txt/0 kept after all): the earlier reviewed file goes, accounting still holds
    append_decision(dec, "txt/0", "keep")
    s = apply_decisions(run, [dec], out)
    assert (s["kept"], s["rejected"], s["review"]) == (3, 1, 1)
    assert _digest(run) == _digest(run)  # the run itself is never written
    assert sorted(os.listdir(os.path.join(run, "review"))) == ["a-000.parquet", "b-000.parquet"]


def test_review_cli_errors_are_one_line(run, tmp_path):
    ivl = os.path.join(os.path.dirname(sys.executable), "ivl")
    p = subprocess.run([ivl, "review", "apply", "--in", run, "--decisions", str(tmp_path / "none.jsonl"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "does not exist" in p.stderr
    p = subprocess.run([ivl, "review", "serve", "--in", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "no review/ folder" in p.stderr


# ---- the server's API ---------------------------------------------------------------------------

@pytest.fixture()
def server(run):
    httpd, url = serve(run)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd, url
    httpd.shutdown()
    httpd.server_close()


def _get(url: str, headers: dict | None = None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return r.status, r.headers, r.read()


def _post(url: str, body: dict, ctype: str = "application/json"):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_lists_filters_serves_images_and_records_decisions(run, server):
    httpd, url = server
    assert url.startswith("http://127.0.0.1:")
    rows = json.loads(_get(url + "api/rows")[2])
    assert rows["total"] == 3 and rows["sources"] == ["cap", "txt"]
    assert json.loads(_get(url + "api/rows?reason=ngram_repetition")[2])["total"] == 1
    assert json.loads(_get(url + "api/rows?source=txt")[2])["rows"][0]["id"] == "txt/0"
    assert [r["id"] for r in json.loads(_get(url + "api/rows?score=score_ngram&min=0.5")[2])["rows"]] == ["txt/0"]
    detail = json.loads(_get(url + "api/row/0")[2])
    assert detail["dup_neighbours"] == ["cap/9"] and detail["images"] == 1
    status, headers, data = _get(url + "api/image/1/1")
    assert data == read_rows(os.path.join(run, "review"))[1]["images"][1] and headers["Content-Type"] == "image/png"
    assert _post(url + "api/decision", {"id": "cap/1", "decision": "reject", "note": "two copies"})[0] == 200
    rec = [json.loads(x) for x in open(os.path.join(run, "review", "decisions.jsonl"))]
    assert [(r["id"], r["decision"], r["note"]) for r in rec] == [("cap/1", "reject", "two copies")]
    assert json.loads(_get(url + "api/rows?undecided=1")[2])["total"] == 2


def test_server_refuses_what_it_must(server):
    httpd, url = server
    assert httpd.server_address[0] == "127.0.0.1"
    assert _post(url + "api/decision", {"id": "nope", "decision": "keep"})[0] == 404
    assert _post(url + "api/decision", {"id": "cap/0", "decision": "maybe"})[0] == 400
    # a cross-site form post cannot set a JSON content type
    assert _post(url + "api/decision", {"id": "cap/0", "decision": "keep"}, "application/x-www-form-urlencoded")[0] == 415
    with pytest.raises(urllib.error.HTTPError) as e:  # DNS rebinding: a foreign Host header
        _get(url + "api/rows", {"Host": "evil.example:80"})
    assert e.value.code == 403
    _, headers, _ = _get(url)
    assert "script-src 'self'" in headers["Content-Security-Policy"]


# ---- pages in a real browser --------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium + chromium-driver are not installed (make setup installs them)")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager reach for the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _not_blank(png: bytes) -> int:
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB").resize((200, 160))
    return len(set(im.get_flattened_data()))


def _wait(driver, cond, timeout=15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: cond(d))


def test_review_page_in_chromium_decides_with_keys_and_keeps_markup_as_text(run, server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _, url = server
    browser.get(url)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 3)
    _wait(browser, lambda d: d.find_element(By.ID, "row-id").text == "cap/0")
    assert browser.find_elements(By.CSS_SELECTOR, "#images img")[0].get_attribute("naturalWidth") != "0"
    assert "cap/9" in browser.find_element(By.ID, "neighbours").text
    browser.find_element(By.TAG_NAME, "body").send_keys("k")  # keep cap/0, move on to cap/1
    _wait(browser, lambda d: d.find_element(By.ID, "row-id").text == "cap/1")
    browser.find_element(By.ID, "note").send_keys("two near-identical stamps")
    browser.find_element(By.ID, "reject").click()
    _wait(browser, lambda d: d.find_element(By.ID, "row-id").text == "txt/0")
    turns = browser.find_elements(By.CSS_SELECTOR, "#conversation .turn")
    assert HOSTILE in turns[1].text  # shown as text
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#conversation script, #conversation img")
    png = browser.get_screenshot_as_png()
    (tmp_path / "review.png").write_bytes(png)
    shutil.copy(tmp_path / "review.png", "/tmp/review_page.png") if os.environ.get("IVL_KEEP_SHOTS") else None
    assert _not_blank(png) > 50
    got = load_decisions([os.path.join(run, "review", "decisions.jsonl")])
    assert {k: (v["decision"], v["note"]) for k, v in got.items()} == {
        "cap/0": ("keep", ""), "cap/1": ("reject", "two near-identical stamps")}


def test_job_and_chain_reports_are_self_contained_pages(run, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from pipeline.report import bar_chart

    bar_chart({"dedup:exact": 1}, os.path.join(run, "report", "rejected_by_rule.png"), "rows rejected per rule")
    page = write_job_report(run)
    text = open(page, encoding="utf-8").read()
    assert "data:image/png;base64," in text and "<script>window" not in text and html_escaped(HOSTILE) in text
    ingest = tmp_path / "ingest"
    os.makedirs(ingest / "report")
    (ingest / "report" / "summary.json").write_text(json.dumps({"input": 6, "kept": 5, "rejected": 1}))
    chain = write_chain_report(str(tmp_path / "chain"), {"ingest": str(ingest), "curate": run})
    for path in (page, chain):
        browser.get("file://" + path)
        _wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text.startswith("ivl"))
        assert not browser.find_elements(By.TAG_NAME, "script")
        assert browser.execute_script("return window.__pwned === undefined")
        imgs = browser.find_elements(By.TAG_NAME, "img")
        assert imgs and all(i.get_attribute("naturalWidth") != "0" for i in imgs)  # embedded, not linked
        assert _not_blank(browser.get_screenshot_as_png()) > 50
    assert "text_rules:symbol_ratio" in browser.page_source and "ingest" in browser.find_element(By.TAG_NAME, "table").text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


@pytest.mark.slow
def test_review_apply_on_a_real_curate_run(tmp_path, sample_meta, ray_local):
    """The real curate runner on the bundled sample: every review row decided -> review/ empty, accounting holds."""
    from pipeline.curate import CurateConfig, run_curate
    from pipeline.ingest import run_ingest

    run_ingest([sample_meta], str(tmp_path / "ingest"))
    # Gopher's document length rule on every text (most sample answers are under 60 words) fills review/
    cfg = CurateConfig(stages=[{"op": "text_rules", "doc_min_words": 1, "min_words": 60},
                               {"op": "image_checks"}], dedup={})
    s = run_curate(str(tmp_path / "ingest"), str(tmp_path / "curate"), cfg)
    review = read_rows(tmp_path / "curate" / "review")
    assert len(review) > 10
    dec = str(tmp_path / "d.jsonl")
    for i, r in enumerate(review):
        append_decision(dec, r["id"], "keep" if i % 2 else "reject", f"note {i}")
    out = apply_decisions(str(tmp_path / "curate"), [dec], str(tmp_path / "applied"))
    assert out["input"] == s["input"] and out["review"] == 0
    assert out["kept"] == s["kept"] + len(review) // 2
    assert out["rejected"] == s["rejected"] + len(review) - len(review) // 2
    page = write_job_report(str(tmp_path / "applied"))
    assert "review:manual" in open(page, encoding="utf-8").read()
    assert SAMPLE.exists()
