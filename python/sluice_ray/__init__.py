"""sluice_ray: the Ray side of Sluice's cluster runtime.

On a Ray cluster Sluice runs as one Ray job whose entrypoint is

    python -m sluice_ray.driver [options] -- <controller argv...>

The driver (``sluice_ray.driver``) starts the Rust controller as its child and
speaks JSON lines with it: commands on the child's stdout, events on the
child's stdin. Every replica or proxy is a detached, named Ray actor
(``sluice_ray.host.ProcessHost``) hosting one native process. The protocol is
described in python/README.md and in ``sluice_ray.driver``'s docstring.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
