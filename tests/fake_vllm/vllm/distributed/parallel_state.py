"""vLLM's teardown functions; each call is recorded in ``CALLS`` (tests clear it)."""

CALLS: list[str] = []


def destroy_model_parallel() -> None:
    CALLS.append("destroy_model_parallel")


def destroy_distributed_environment() -> None:
    CALLS.append("destroy_distributed_environment")
