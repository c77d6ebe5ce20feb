"""What a fuzzing run did and found, shared by every target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

#: How long one well-behaved round trip may take while the fuzzing goes on.
PROGRESS_LIMIT: Final = 10.0


@dataclass
class FuzzReport:
    """What a fuzzing run did and found."""

    frames: int = 0
    connections: int = 0
    dropped: int = 0
    good_requests: int = 0
    seconds: float = 0.0
    crashes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.crashes == 0 and not self.problems

    def summary(self) -> str:
        check = "OK" if not self.problems else "FAILED: " + "; ".join(self.problems[:5])
        return (
            f"fuzz: frames={self.frames} connections={self.connections} "
            f"dropped={self.dropped} good-requests={self.good_requests} "
            f"seconds={self.seconds:.1f} crashes={self.crashes} invariants={check}"
        )


class Budget:
    """Frames still to send, shared by the workers."""

    def __init__(self, frames: int) -> None:
        self.left = frames


#: The request id of the last request on a connection that reads its replies.
