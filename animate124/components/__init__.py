"""threestudio components, registered under the ``a124-`` prefix. Importing this package registers them."""
