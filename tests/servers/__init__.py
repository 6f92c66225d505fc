"""Local servers the test run starts itself (session-scoped pytest fixtures)."""
