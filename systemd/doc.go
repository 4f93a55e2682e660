// Package systemd holds the unit files of ublk-nvmeof (ublk-nvmeof@.service,
// a template whose instance names an environment file of options, and
// example.env); its test checks them with systemd-analyze verify. The
// notification protocol itself is spoken by package attach.
package systemd
