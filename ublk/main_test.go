package ublk

import (
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine this package starts has an owner that joins it; a test
// binary that ends with extra goroutines fails.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
