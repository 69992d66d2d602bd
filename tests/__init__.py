# regopy before aiohttp (see proxy/__init__.py): test modules import aiohttp before proxy.
import regopy  # noqa: F401
