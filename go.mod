module github.com/ublk-nvmeof/ublk-nvmeof

go 1.26
