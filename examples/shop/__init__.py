"""The example shop: users, orders, inventory, payments and notifications on rpcmesh."""
