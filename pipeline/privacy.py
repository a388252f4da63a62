"""Privacy: keep every library offline and quiet before it is imported.

Called first by every command (``cli.main``). Later issues add PII detection and the network egress guard
here; this module stays a leaf.
"""

from __future__ import annotations

import os

# Each variable switches off a network call a library would otherwise make on its own.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub: never resolve or download from the Hub
    "TRANSFORMERS_OFFLINE": "1",  # transformers (older spelling, still honoured)
    "HF_DATASETS_OFFLINE": "1",  # datasets
    "HF_HUB_DISABLE_TELEMETRY": "1",  # no usage pings
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",  # never attach a stored token to a request
    "DO_NOT_TRACK": "1",  # the cross-tool convention (read by huggingface_hub, mlflow and others)
    "MLFLOW_DISABLE_TELEMETRY": "true",  # mlflow 3 usage telemetry
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # keep logs readable
    "TOKENIZERS_PARALLELISM": "false",  # avoid the fork warning; we tokenize in one process
    "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": "",  # tldextract (used by PII detectors) must not fetch its list
}


def offline_environment() -> dict[str, str]:
    """Force the offline and no-telemetry variables, whatever the shell had, and return them.

    No recipe setting allows Hub access, so a stray ``HF_HUB_OFFLINE=0`` in a user's shell must not turn
    it on.
    """
    os.environ.update(OFFLINE_ENVIRONMENT)
    return dict(OFFLINE_ENVIRONMENT)
