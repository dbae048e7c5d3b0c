"""A shared link with random query parameters: the configuration is read without error, every value that
was not used and every parameter that is not a setting is named, and the page opens saying so (issue 22)."""

import os
import random
import string
from dataclasses import asdict, fields

import pytest

from jpq_core.links import read_link
from jpq_core.live import LiveConfig

EXAMPLES = int(os.environ.get("JPQ_FUZZ_EXAMPLES", "40")) * 50  # read_link is cheap: 2,000 links in the suite
SETTINGS = [f.name for f in fields(LiveConfig)]
ODD = ["", " ", "nan", "inf", "-inf", "1e400", "-0", "0.9999999", "1", "9" * 5000, "float", "FLOAT", "True", "true ",
       "taylor-abs", "  8 ", "\u0668", "0x10", "1_0", "8.0", "stereo\x00", "\u202eoeretS", "'; DROP TABLE--", "%00", "{}", "[]"]
ALPHABET = string.printable + "\u00e9\u0661\u202e\x00\U0001F600"


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(ODD)
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))


def random_link(rng: random.Random) -> dict:
    keys = SETTINGS + ["foo", "", "Network", "sparsity ", "x" * 300, "\x00", "embed"]
    return {rng.choice(keys) if rng.random() < 0.8 else random_text(rng): random_text(rng) if rng.random() < 0.9
            else [random_text(rng), random_text(rng)] for _ in range(rng.randint(0, 8))}


def test_random_links_give_a_configuration_and_name_everything_ignored():
    rng = random.Random(random.randrange(2**32))
    for _ in range(EXAMPLES):
        link = random_link(rng)
        config, notices = read_link(link)
        config.compression_config()  # a configuration the pipeline takes
        assert config.granularity in ("weight", "channel")
        used = config.to_query()
        for key, value in link.items():
            value = value[-1] if isinstance(value, list) else value
            if key == "embed":
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
def test_the_page_opens_with_random_query_parameters_and_names_what_it_ignored(root):
    from streamlit.testing.v1 import AppTest

    rng = random.Random(7)
    junk = {"zoom": random_text(rng) or "x", "wbits": "\u0668\u202e", "sparsity": "1e400", "criterion": "'; DROP TABLE--",
            "x" * 300: "y"}
    at = AppTest.from_file(str(root / "app.py"), default_timeout=240)
    at.query_params.update({"network": "resnet20", **junk})
    at.run()
    assert not at.exception
    shown = " ".join(w.value for w in at.warning)
    for key in ("zoom", "wbits", "sparsity", "criterion", "x" * 40):
        assert key in shown, (key, shown)
    assert {m.label for m in at.metric} >= {"Top-1", "Weight memory"}  # the page works with the defaults
