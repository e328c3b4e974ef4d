"""What the project promises of every error a user reads: one plain line (no traceback, no escape codes
a crafted file could plant in a terminal)."""


def one_plain_line(msg: str) -> str:
    msg = msg.strip()
    assert msg and "\n" not in msg and "\x1b" not in msg and "Traceback" not in msg, msg
    return msg
