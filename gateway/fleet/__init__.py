"""Several gateways on one database: every one serves, the lease holder acts.

`follower.Follower` routes the requests of a gateway that is not the lease holder to the ready
deployments it reads from the store, and holds its cold requests while it reports them;
`launches.LaunchRequests` is the holder's side: the reports become launches and load;
`notify.Listener` wakes both on PostgreSQL's NOTIFY.
"""
