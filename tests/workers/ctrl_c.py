"""Worker: the trainer's Ctrl-C handling in a real process. Two SIGINTs at once count as one
(a launcher forwarding the terminal's Ctrl-C to processes that got it already); one that comes
later than ``StopRequest.REPEAT_S`` exits 130 at once."""

import os
import signal
import time

from vqmoe_megatron.training.trainer import StopRequest


def main() -> None:
    stop = StopRequest()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    print(f"after two at once: {stop.signal}", flush=True)
    time.sleep(StopRequest.REPEAT_S + 0.5)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    print("still running", flush=True)


if __name__ == "__main__":
    main()
