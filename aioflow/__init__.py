"""aioflow: durable orchestrations for asyncio."""
