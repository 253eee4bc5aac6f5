"""The teacher store: one Zarr v3 group per data set split holding every teacher's logits, Grad-CAM maps
and explanation scores. `layout` is the only module that spells an array key and states the format and
extraction versions; `location` is where the store's objects live (a folder or a bucket); `teacher_store`
reads and writes; `shards` creates sharded arrays and reads their files directly; `digests` binds every file
to its place; `codec` turns stored values into tensors; `integrity` finds and repairs damage; `info` is what
`pipeline store info` and `verify` print."""
