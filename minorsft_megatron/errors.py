"""The one base class of everything a user can cause and fix: bad input, a setting this machine cannot run, a
file in the way. Every command reports one as a single line (`error: ...`) and exits with status 2; anything
else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A problem with the user's input or environment; the message is one line naming the file, key or flag."""


LOST_PEER_EXIT = 3  # the exit status of a rank whose collective lost a peer: another process or node died
SEE_FIRST_FAILURE = "the first failure in the job's logs says why"
"""How a lost-peer line ends: the process that died first reported the cause (or was killed, and its agent said so)."""
_LOST_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "NCCL communicator was aborted", "ProcessGroupNCCL's watchdog got stuck")


def lost_peer(err: BaseException) -> str | None:
    """The gist of a collective's failure because a peer went away (gloo's reset connection, NCCL's aborted
    communicator), else None: what a rank reports in one line when another process or node of the job died."""
    import re

    message = str(err).strip()
    text = message.splitlines()[0] if message else ""
    if not any(marker in text for marker in _LOST_PEER_MARKERS):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's [source file:line] prefix
    return text.split(" This is typically")[0].rstrip(".")
