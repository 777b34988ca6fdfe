-- When the current holder of each lease took it (milliseconds), for `workers status`.
ALTER TABLE leases ADD COLUMN since INTEGER;
