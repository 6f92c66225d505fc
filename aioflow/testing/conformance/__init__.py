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
"""

from aioflow.testing.conformance.contract import BackendContractSuite

__all__ = ["BackendContractSuite"]
