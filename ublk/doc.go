// Package ublk binds the Linux ublk driver (drivers/block/ublk_drv.c) in
// pure Go: a userspace daemon serves the I/O of a block device /dev/ublkbN.
//
// The control side is a Control (/dev/ublk-control): feature detection,
// adding, starting, stopping, deleting and recovering devices. Commands are
// io_uring URING_CMDs on 128-byte SQEs, ioctl-encoded when the driver
// supports it, legacy opcodes otherwise.
//
// Kernel structs and constants live in internal/uapi with their kernel
// names; the io_uring is internal/uring.
package ublk
