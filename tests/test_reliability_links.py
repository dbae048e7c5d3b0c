"""A shared link with random query parameters: the configuration is read without error, every value that
was not used and every parameter that is not a setting is named, and the page opens saying so (issue 22)."""

import os
import random
from dataclasses import fields

import pytest

from jpq_core.jobs import is_owner_token
from jpq_core.links import read_link
from jpq_core.live import LiveConfig

EXAMPLES = int(os.environ.get("JPQ_FUZZ_EXAMPLES", "40")) * 50  # read_link is cheap: 2,000 links in the suite
PAGE_EXAMPLES = int(os.environ.get("JPQ_PAGE_FUZZ_EXAMPLES", "30"))  # each opens the page: about 1 s
SETTINGS = [f.name for f in fields(LiveConfig)]


def test_random_links_give_a_configuration_and_name_everything_ignored(fuzz):
    rng = random.Random(random.randrange(2**32))
    for _ in range(EXAMPLES):
        link = fuzz.random_link(rng, SETTINGS)
        config, notices = read_link(link)
        config.compression_config()  # a configuration the pipeline takes
        assert config.granularity in ("weight", "channel")
        used = config.to_query()
        for key, value in link.items():
            value = value[-1] if isinstance(value, list) else value
            if key == "embed":
                continue
            if key == "job_owner":
                assert is_owner_token(value) or any(n.startswith("ignored job_owner=") for n in notices), (value, notices)
                continue
            if key not in SETTINGS:
                assert any(repr(key[:40])[:-1] in n and "not a setting" in n for n in notices), (key, notices)
            elif value != used[key] and not _same_setting(key, value, used[key]):
                assert any(n.startswith(f"ignored {key}=") for n in notices), (key, value, notices)
        assert all(len(n) < 400 for n in notices), notices


def _same_setting(key, value, used) -> bool:
    """A value given differently but read as the same setting (' 8 ' for 8, 'TRUE' for true, 0.51 -> slider stop 0.5)."""
    read, problems = LiveConfig.from_query({key: value})
    return not problems and read == LiveConfig.from_query({key: used})[0]


def test_a_good_link_is_read_exactly_with_nothing_ignored():
    config = LiveConfig(network="resnet20", criterion="magnitude", sparsity=0.9, wbits=4, abits=None, protect_first_last=False)
    assert read_link({**config.to_query(), "embed": "true"}) == (config, [])


def test_unknown_and_overlong_parameters_are_named_shortened():
    config, notices = read_link({"sparsity": "0.9", "spasity": "0.5", "network": "s" * 5000})
    assert config == LiveConfig(sparsity=0.9)
    assert notices[1].startswith("ignored network='" + "s" * 40 + "...' from the link (too long for this setting); using 'stereo'.")
    assert notices[0].startswith("ignored 'spasity'='0.5' from the link: not a setting of this app (the settings are network, ")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_page_opens_with_random_query_parameters_and_names_what_it_ignored(root, fuzz):
    from streamlit.testing.v1 import AppTest

    rng = random.Random(7)
    junk = {"zoom": fuzz.random_text(rng) or "x", "wbits": "\u0668\u202e", "sparsity": "1e400", "criterion": "'; DROP TABLE--",
            "x" * 300: "y"}
    at = AppTest.from_file(str(root / "app.py"), default_timeout=240)
    at.query_params.update({"network": "resnet20", "recovery": "none", **junk})  # recovery: seconds, tested elsewhere
    at.run()
    assert not at.exception
    shown = " ".join(w.value for w in at.warning)
    for key in ("zoom", "wbits", "sparsity", "criterion", "x" * 40):
        assert key in shown, (key, shown)
    assert {m.label for m in at.metric} >= {"Top-1", "Weight memory"}  # the page works with the defaults


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_explore_opens_with_random_links_and_shows_every_notice(fuzz, tmp_path, monkeypatch):
    """PAGE_EXAMPLES random links, each an AppTest run of Explore (scripts/fuzz.py's links family; the script runs
    more, some on the stereo network): no exception, no traceback, every notice of `read_link` shown as a warning."""
    monkeypatch.setattr(fuzz.ALL["links"], "fixed_share", 1.0)  # ResNet-20 without recovery: seconds per page
    seed = random.randrange(2**32)
    tally = fuzz.run(["links"], PAGE_EXAMPLES, seed, tmp_path / "failures", progress=False)["links"]
    assert tally["inputs"] == PAGE_EXAMPLES
    assert tally.get("failed", 0) == 0, f"seed {seed}: {tally['failures by type']} (links saved in {tmp_path / 'failures'})"
