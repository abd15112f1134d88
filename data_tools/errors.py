"""The two ways bad input ends: a fatal `DataError` (one line, before expensive work) or a `Skip`
of one input item, counted by reason in the shard set's manifest."""


class DataError(Exception):
    """Bad input or an unusable output that stops the whole command.

    The message is one line naming the file, key or value; the CLI prints it without a
    traceback and exits with status 2.
    """


class Skip(Exception):
    """One input item cannot become a sample; the writer counts it under `reason`.

    `reason` is a short snake_case tag (e.g. "corrupt_image", "empty_caption") that becomes a
    key of manifest.json's "skipped" map; `detail` is a human-readable note kept for the first
    few items of each reason.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
