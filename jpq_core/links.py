"""Reading a shared link: URL query parameters -> the live configuration, and what was ignored, in words.

A link is typed, pasted, cut short or edited by hand, so any parameter may hold any string. `read_link`
never raises: each value that `LiveConfig.from_query` cannot use falls back to its default, each parameter
that is not a setting is named (but for `job_owner`, the session's fine-tuning job token, when it is one),
and the page shows every notice (`jpq_core.ui` warns with them), so a link with a typo still opens and says
what it ignored. Values are echoed shortened, so a 5,000-character
parameter gives a one-line notice.
"""

from __future__ import annotations

from dataclasses import fields

from jpq_core.jobs import is_owner_token
from jpq_core.live import LiveConfig

STREAMLIT_PARAMETERS = ("embed", "embed_options")  # Streamlit's own; not ours to report
OWNER_PARAMETER = "job_owner"  # the session's fine-tuning jobs (jpq_core.jobs): read by the page, not a setting
MAX_ECHO = 40  # characters of a value or name shown in a notice
MAX_VALUE = 64  # characters of the longest value worth parsing


def _shown(text: str) -> str:
    text = str(text)
    return repr(text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "...")


def _last(value) -> str:
    """A repeated parameter (?a=1&a=2) arrives as a list: the last one counts, as in Streamlit's to_dict()."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return str(value)


def read_link(params) -> tuple[LiveConfig, list[str]]:
    """(configuration, notices) from a mapping of query parameters; never raises."""
    settings = [f.name for f in fields(LiveConfig)]
    default, values, notices = LiveConfig(), {}, []
    for key, value in dict(params).items():
        value = _last(value)
        if key == OWNER_PARAMETER:
            if not is_owner_token(value):
                notices.append(f"ignored {key}={_shown(value)} from the link: not a fine-tuning job token (this "
                               "session's jobs get a new one).")
        elif key not in settings:
            if key not in STREAMLIT_PARAMETERS:
                notices.append(f"ignored {_shown(key)}={_shown(value)} from the link: not a setting of this app "
                               f"(the settings are {', '.join(settings)}).")
        elif len(value) > MAX_VALUE:  # no setting has a value this long (a checkpoint hash has 40 characters)
            notices.append(f"ignored {key}={_shown(value)} from the link (too long for this setting); "
                           f"using {getattr(default, key)!r}.")
        else:
            values[key] = value
    config, problems = LiveConfig.from_query(values)
    return config, problems + notices
