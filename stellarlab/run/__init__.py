"""Running a job: the pre-flight check of a config, devices, resume and run locks, the callbacks that keep a
run resumable, sweeps and their failure budget, and the allocator setting of the commands."""
