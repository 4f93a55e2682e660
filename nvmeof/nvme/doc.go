// Package nvme holds the NVMe structures that travel inside NVMe/TCP
// capsules: the submission queue entry (SQE), the completion queue entry
// (CQE), status codes as Go errors, and the data structures returned by
// Identify and Get Log Page. It mirrors include/linux/nvme.h; constant names
// keep the kernel's spelling.
//
// Raw layouts are byte arrays of the exact wire size (Command, Completion);
// idiomatic structs (IdentifyController, Namespace, DiscoveryLogEntry, ...)
// are decoded from them by functions that check every length they are given.
package nvme
