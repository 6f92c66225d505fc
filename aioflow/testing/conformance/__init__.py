"""The backend conformance suite: the executable form of the contract in `aioflow.backend`.

Every backend, built in or third party, proves itself by subclassing `BackendContractSuite` in
its own test suite and providing one fixture::

    import pytest_asyncio
    from aioflow.testing.conformance import BackendContractSuite

    class TestMyBackendContract(BackendContractSuite):
        @pytest_asyncio.fixture
        async def backend(self, tmp_path):
            store = await open_my_backend(tmp_path)   # open and empty
            yield store
            await store.close()

`OrchestrationSuite` (subclassed the same way) runs every orchestration feature end to end on a
real worker and client over the backend.
"""

from aioflow.testing.conformance.contract import BackendContractSuite
from aioflow.testing.conformance.orchestrations import OrchestrationSuite
from aioflow.testing.conformance.processes import FaultInjectionSuite, MultiProcessSuite

__all__ = [
    "BackendContractSuite",
    "FaultInjectionSuite",
    "MultiProcessSuite",
    "OrchestrationSuite",
]
