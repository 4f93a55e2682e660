// Package ublk binds the Linux ublk driver (drivers/block/ublk_drv.c) in
// pure Go (golang.org/x/sys, no cgo): a daemon process serves the I/O of a
// block device /dev/ublkbN.
//
// # Control
//
// A Control is the open /dev/ublk-control. It reports the driver's
// Features, creates devices (Create), takes over the devices of a daemon
// that died (Recover), lists them (List, DeviceInfo, Params) and removes
// leftovers (Remove). Every control command is an io_uring URING_CMD on a
// 128-byte SQE, ioctl-encoded when the driver has UBLK_F_CMD_IOCTL_ENCODE
// (6.2+) and in the legacy encoding otherwise. Each command is bounded by
// its context (DefaultCommandTimeout without a deadline): a kernel call
// that does not return is reported with ErrTimeout, never waited on
// forever. A missing kernel feature is an error matching ErrNotSupported
// that names the feature and the release that brought it (*FeatureError).
//
//	c, err := ublk.OpenControl() // ErrNotLoaded: modprobe ublk_drv
//	...
//	dev, err := c.Create(ctx, ublk.Options{
//		ID: ublk.AutoID, Queues: 2, Depth: 128,
//		Params:   ublk.Params{Size: size, VolatileCache: true, FUA: true},
//		Recovery: ublk.RecoveryReissue,
//	}, backend)
//	... // /dev/ublkbN serves I/O through backend
//	err = dev.Close(ctx) // STOP_DEV, join the queues, DEL_DEV
//
// # Data path
//
// Each hardware queue is served by one goroutine locked to its OS thread
// (the driver binds a queue to the task that fetches its requests), owning
// that queue's io_uring, the queue's read-only descriptor array mapped from
// /dev/ublkcN, and Depth tag buffers of MaxIOBytes in anonymous mmap'd
// memory that the kernel copies request data into and out of. Requests go
// to a Backend; see its documentation for the contract. Completions from
// other goroutines reach the queue thread through an eventfd whose read is
// posted on the ring, so completing never blocks and the queue thread never
// polls.
//
// A RingBackend does its own I/O as operations on the queue's ring
// (Request.Ring) and gets their completions on the queue's goroutine. With
// Options.ZeroCopy (UBLK_F_AUTO_BUF_REG, 6.16; the backend must be a
// ZeroCopyBackend, also to recover such a device) there are no tag buffers:
// the driver registers each request's pages in the ring's buffer table at
// the tag's slot, the RingBackend's fixed-buffer operations move the data
// to or from them directly, and every such operation must be reaped before
// the request is completed (docs/design.md, Zero copy). Such a device also
// has UBLK_F_USER_COPY (6.4): a few bytes of a request are cheaper to move
// by a copy than by an operation on the ring, and Request.ReadAt and
// WriteAt do that copy (pread and pwrite on /dev/ublkcN).
//
// # Life cycle
//
// Create: ADD_DEV, SET_PARAMS, open /dev/ublkcN, start the queues and wait
// until each has armed a FETCH_REQ for every tag, then START_DEV from the
// calling goroutine while the queues already serve (START_DEV waits for all
// fetches and for the partition scan's reads). Close: STOP_DEV while the
// queues still serve (it drains in-flight I/O), the queues see every fetch
// aborted (-ENODEV) and exit, closing their rings and unmapping; then
// /dev/ublkcN is closed and DEL_DEV removes the device. Stop does the first
// half alone (the block device goes, the device stays until Close), for
// callers that must quiesce the block side before shutting their backend
// down. DEL_DEV waits until
// every opener of /dev/ublkbN closed it. Every error path undoes what was
// done: no device, fd, mapping or goroutine is left behind.
//
// # User recovery
//
// A device created with Recovery or RecoveryReissue outlives its daemon:
// when the process dies the driver queues new I/O (and with
// RecoveryReissue also re-queues what was in flight), and a new process
// calls Recover: START_USER_RECOVERY, every tag fetched again by new
// queues, END_USER_RECOVERY. Applications see a pause, not an error.
//
// Kernel structs and constants live in internal/uapi under their kernel
// names; the io_uring is internal/uring.
package ublk
