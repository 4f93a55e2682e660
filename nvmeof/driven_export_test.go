package nvmeof

// DrivenOwnership reports whether q's driven socket is still open and its
// receive and send buffers still mapped (owned), and whether the queue was
// released. Call it on the Driver's thread: the buffers are that thread's.
func DrivenOwnership(q *Queue) (owned, released bool) {
	ds := q.driven.Load()
	if ds == nil {
		return false, false
	}
	q.mu.Lock()
	fd := ds.fd
	q.mu.Unlock()
	return fd >= 0 && ds.rbuf != nil && ds.sbuf != nil, ds.released
}

// DrivenPlaced is how many C2HData PDUs q's driven transport received
// straight into their command's buffer.
func DrivenPlaced(q *Queue) int {
	if ds := q.driven.Load(); ds != nil {
		return ds.placedN
	}
	return 0
}

// DrivenPlacing reports whether q's receive in flight lands in a
// command's buffer. On the Driver's thread.
func DrivenPlacing(q *Queue) bool {
	ds := q.driven.Load()
	return ds != nil && ds.recvBusy && ds.recvPlaced
}

// DrivenGathers is how many of q's driven sends took data straight from
// commands' buffers.
func DrivenGathers(q *Queue) int {
	if ds := q.driven.Load(); ds != nil {
		return ds.gathers
	}
	return 0
}

// DrivenSendingHeld reports whether q's send in flight takes data from a
// command's buffer. On the Driver's thread.
func DrivenSendingHeld(q *Queue) bool {
	ds := q.driven.Load()
	return ds != nil && ds.sendBusy && len(ds.held) > 0
}
