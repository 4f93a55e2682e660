package ublk

// Backend serves the I/O of a device.
//
// For every request the driver hands to a queue, the queue's goroutine calls
// Serve with a *Request describing it. Serve must not block for long (it
// holds up every other request of that queue); it starts the work and
// returns. The Backend finishes the request by calling req.Complete exactly
// once, from any goroutine, before or after Serve returns: a backend that
// works synchronously completes inside Serve; the NVMe/TCP backend sends a
// command and completes from the goroutine that receives the response.
// Complete never blocks: it queues the result and, if needed, wakes the
// queue's thread through an eventfd whose read is posted on that queue's
// io_uring.
//
// One tag is one in-flight request, so a queue never has more than Depth
// requests outstanding, and a request's Tag can index per-slot state (such
// as an NVMe command identifier) without allocation. Requests of one queue
// are only ever passed to Serve from that queue's goroutine; requests of
// different queues arrive concurrently.
//
// req.Buf is memory owned by the queue (mapped, so the kernel can copy
// into and out of it): valid from Serve until Complete, not after. READ
// fills it, WRITE reads it. FLUSH asks for the backend's volatile cache to
// be made durable; a WRITE with req.FUA() must be durable when it
// completes; DISCARD and WRITE_ZEROES carry no buffer, and after either a
// read of the range must return zeros (WRITE_ZEROES with FlagNoUnmap must
// keep the blocks allocated).
//
// The driver puts no deadline on a request of a live daemon (for
// privileged devices its block-layer timer just re-arms), so a backend may
// hold requests as long as it needs, e.g. while it reconnects; it must
// complete them eventually, or Device.Close reports STOP_DEV as stuck.
// Requests still held when the queues are forced down are failed (or, with
// recovery, requeued) by the driver once it sees the queue threads exit;
// completing them afterwards is harmless.
//
// A device with RecoveryReissue may see a request that a previous daemon
// already executed: writes must be idempotent (they are for block
// storage).
type Backend interface {
	Serve(req *Request)
}

// Committer is a Backend that starts work in batches: the queue's goroutine
// calls Commit(queue) after every batch of Serve calls (the requests it
// fetched from one wait on its ring), so a Backend may hold back the
// doorbell of each request and ring it once for the batch (blk-mq's
// bd->last and commit_rqs). Commit must not block for long either.
type Committer interface {
	Commit(queue int)
}

// BackendFunc adapts a function to Backend.
type BackendFunc func(req *Request)

// Serve calls f(req).
func (f BackendFunc) Serve(req *Request) { f(req) }
